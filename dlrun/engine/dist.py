"""Distributed concerns in one place: rank, world size, the main process, all-reduces.

Without `torch.distributed` initialised (every run today) each function is the one-process
answer, so the loop calls them unconditionally: summing metrics, OR-ing the NaN and stop flags,
writing files on the main process only. A DDP launcher (torchrun) initialises the process group
before the run starts and the same calls then span every rank.
"""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def init_from_env() -> bool:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1 in the
    environment): gloo for CPU tensors, NCCL for CUDA ones, and LOCAL_RANK's GPU as this
    process's device. Returns whether it joined (False: a single process, nothing to do)."""
    if initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # one group; each tensor goes by its device
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """The process that writes: run folder, TensorBoard, checkpoints, metrics.json."""
    return rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks, in place (a metric's sum or count); the tensor itself on one process."""
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank: a NaN seen or a stop signal received by one stops all."""
    if not initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """One picklable object from every rank, in rank order (e.g. each rank's RNG states)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every rank (e.g. the run folder rank 0 claimed)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_trained(
    roles: dict[str, nn.Module], trained: list[str], device: torch.device
) -> dict[str, nn.Module]:
    """Under torchrun each trained role in DistributedDataParallel, on its own (a GAN's two
    networks step apart), so its gradients are averaged over ranks; unchanged otherwise."""
    if not initialized():
        return dict(roles)
    ids = [device.index] if device.type == "cuda" else None
    return {
        r: nn.parallel.DistributedDataParallel(m, device_ids=ids) if r in trained else m
        for r, m in roles.items()
    }
