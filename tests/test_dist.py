"""dlrun.engine.dist, ShardedSampler and DDP across two real processes (gloo, CPU).

Each rank runs `_worker` in its own spawned process, checks what it can alone, and writes what
it saw to rank<r>.json; the test compares the ranks. A rank that raises fails the test
(torch.multiprocessing re-raises it here); a rank that hangs in a collective is cut off by the
process group's timeout.
"""

import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from dlrun.data.samplers import RandomSampler, ShardedSampler
from dlrun.engine import checkpoint, dist, sync_bn

WORLD = 2
CPU = torch.device("cpu")
N, GLOBAL_BATCH = 23, 7  # 7 = 4 + 3: the first rank gets the extra item


def _worker(rank: int, folder: str) -> None:
    torch_dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    try:
        out = _checks(rank)
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))
        torch_dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        torch_dist.destroy_process_group()
    # Interpreter shutdown can still meet one of gloo's threads and abort (SIGABRT, "terminate
    # called without an active exception"; about 1 run in 30 here, with torch 2.14): the checks
    # are done and written, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _checks(rank: int) -> dict:
    out: dict = {
        "initialized": dist.initialized(),
        "rank": dist.rank(),
        "world_size": dist.world_size(),
        "is_main": dist.is_main(),
    }
    summed = dist.all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * (rank + 1)]))
    out["sum"] = summed.tolist()
    out["any_rank1"] = dist.any_rank(rank == 1, CPU)
    out["any_none"] = dist.any_rank(False, CPU)
    out["gathered"] = dist.gather_objects({"rank": rank, "word": f"from {rank}"})
    out["broadcast"] = dist.broadcast_object(f"value of rank {rank}")

    # Every rank seeds its order generator alike and keeps its slice of each global batch.
    sampler = ShardedSampler(RandomSampler(N, GLOBAL_BATCH), rank, WORLD)
    mine = [b["main"].tolist() for b in sampler.epoch(torch.Generator().manual_seed(0), CPU)]
    out["shards"] = dist.gather_objects(mine)
    inner = RandomSampler(N, GLOBAL_BATCH).epoch(torch.Generator().manual_seed(0), CPU)
    out["inner"] = [b["main"].tolist() for b in inner]
    out["batch_size"] = sampler.batch_size

    # DDP: one backward on this rank's own input; the gradients are averaged over the ranks.
    torch.manual_seed(rank)  # different inits: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(3, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    out["weight"] = model[0].weight.tolist()
    inputs = [torch.arange(3.0) + 10 * r for r in range(WORLD)]  # rank r trains on inputs[r]
    (ddp(inputs[rank][None]) ** 2).sum().backward()
    out["grad"] = [p.grad.tolist() for p in model.parameters()]
    plain = nn.Sequential(nn.Linear(3, 2))
    plain.load_state_dict(model.state_dict())
    expected = [torch.zeros_like(p) for p in plain.parameters()]
    for x in inputs:  # the mean of the per-rank gradients, computed on one process
        plain.zero_grad()
        (plain(x[None]) ** 2).sum().backward()
        for e, p in zip(expected, plain.parameters(), strict=True):
            e += p.grad / WORLD
    out["expected_grad"] = [e.tolist() for e in expected]
    out["sync_bn"] = _sync_bn_checks(rank)
    out["ddp_keys"] = list(ddp.state_dict())
    out["unwrapped_keys"] = list(checkpoint.unwrap(ddp).state_dict())
    out["plain_keys"] = list(model.state_dict())
    return out


def _sync_bn_checks(rank: int) -> dict:
    """SyncBatchNormCPU with and without affine parameters: each rank's output, input gradient
    and running statistics equal one process's BatchNorm over the global batch (its slice)."""
    torch.manual_seed(0)  # the same global batch on every rank
    x = torch.randn(2 * WORLD, 3, 4, 4) * 3 + torch.arange(WORLD * 2.0).view(-1, 1, 1, 1)
    upstream = torch.randn_like(x)  # the gradient of a loss that is not symmetric in the items
    mine = slice(2 * rank, 2 * rank + 2)
    out = {}
    for affine in (False, True):
        plain = nn.BatchNorm2d(3, affine=affine)
        if affine:
            with torch.no_grad():
                plain.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
                plain.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        synced = sync_bn.convert(copy.deepcopy(plain), CPU)
        assert isinstance(synced, sync_bn.SyncBatchNormCPU)
        xs = x[mine].clone().requires_grad_(True)
        got = synced(xs)
        (got * upstream[mine]).sum().backward()
        xg = x.clone().requires_grad_(True)
        want = plain(xg)  # one process, the whole global batch
        (want * upstream).sum().backward()
        out[f"affine={affine}"] = {
            "forward": torch.allclose(got, want[mine], atol=1e-5),
            "grad": torch.allclose(xs.grad, xg.grad[mine], atol=1e-5),
            "running_mean": torch.allclose(synced.running_mean, plain.running_mean, atol=1e-6),
            "running_var": torch.allclose(synced.running_var, plain.running_var, atol=1e-5),
        }
    return out


def test_two_ranks_agree_through_dlrun_dist_sampler_and_ddp(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, out in enumerate(ranks):
        assert out["initialized"] and out["world_size"] == WORLD
        assert out["rank"] == r and out["is_main"] == (r == 0)
        assert out["sum"] == [3.0, 30.0]
        assert out["any_rank1"] is True and out["any_none"] is False
        assert out["gathered"] == [{"rank": 0, "word": "from 0"}, {"rank": 1, "word": "from 1"}]
        assert out["broadcast"] == "value of rank 0"
        assert out["batch_size"] == [4, 3][r]
        assert out["ddp_keys"][0].startswith("module.")
        assert out["unwrapped_keys"] == out["plain_keys"]
        assert torch.allclose(torch.tensor(out["grad"][0]), torch.tensor(out["expected_grad"][0]))
        assert torch.allclose(torch.tensor(out["grad"][1]), torch.tensor(out["expected_grad"][1]))
    a, b = ranks
    assert a["weight"] == b["weight"]  # rank 0's init on both
    assert a["grad"] == b["grad"]
    shards, inner = a["shards"], a["inner"]
    assert shards == b["shards"] and len(inner) == len(shards[0]) == len(shards[1]) == 4
    for batch, mine, theirs in zip(inner, shards[0], shards[1], strict=True):
        assert not set(mine) & set(theirs)
        assert mine + theirs == batch  # the union, in order, is the global batch
    assert sorted(i for batch in inner for i in batch) == list(range(N))
    for out in ranks:  # BatchNorm over the global batch, with and without affine parameters
        assert out["sync_bn"] == {
            f"affine={a}": {"forward": True, "grad": True, "running_mean": True, "running_var": True}
            for a in (False, True)
        }
