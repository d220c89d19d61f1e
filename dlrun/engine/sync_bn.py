"""`trainer.sync_batchnorm=true`: BatchNorm statistics over the global batch of every rank.

On CUDA torch's `nn.SyncBatchNorm` does it with fused kernels. torch's raises on CPU tensors, so
for gloo runs (CPU clusters, and the tests here) `SyncBatchNormCPU` does the same in a few
all-reduces: the forward sums x, x^2 and the count over ranks, the backward sums the two
reductions of the incoming gradient, as `nn.SyncBatchNorm`'s backward does. Each rank then holds
the gradient of the *sum* of the ranks' losses with respect to its own inputs; DDP's averaging
of the parameter gradients turns that into the global batch's mean loss, the same as one process.
"""

from typing import Any

import torch
from torch import Tensor, nn

from dlrun.engine import dist


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # every dimension but the channels


def _shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple:
        c, dims = x.shape[1], _dims(x)
        stats = torch.cat(
            [x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / c])]
        ).double()  # sums of many squares: double keeps var = E[x^2] - E[x]^2 accurate
        dist.all_reduce_sum(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(_shape(x))) * invstd.view(_shape(x))
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total = float(total)
        batch_mean = mean.to(x.dtype)
        unbiased = (var * total / max(float(total) - 1, 1.0)).to(x.dtype)  # running_var's kind
        ctx.mark_non_differentiable(batch_mean, unbiased)
        out = xhat * weight.view(_shape(x)) + bias.view(_shape(x))
        return out, batch_mean, unbiased

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _mean: Tensor, _var: Tensor) -> tuple:
        xhat, weight, invstd = ctx.saved_tensors
        dims = _dims(grad)
        grad_weight, grad_bias = (grad * xhat).sum(dims), grad.sum(dims)
        dxhat = grad * weight.view(_shape(grad))
        sums = torch.cat([dxhat.sum(dims), (dxhat * xhat).sum(dims)])
        dist.all_reduce_sum(sums)
        c = grad.shape[1]
        mean_dy = (sums[:c] / ctx.total).view(_shape(grad))
        mean_dy_xhat = (sums[c:] / ctx.total).view(_shape(grad))
        grad_x = invstd.view(_shape(grad)) * (dxhat - mean_dy - xhat * mean_dy_xhat)
        return grad_x, grad_weight, grad_bias, None


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of any dimension whose training-mode statistics span every rank."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.initialized()):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if not self.affine:  # the statistics are synchronised all the same: a unit scale, no shift
            weight = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
            bias = torch.zeros_like(weight)
        out, mean, var = _SyncBN.apply(x, weight, bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var, m)
        return out


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm synchronised across ranks (in place below the top)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SyncBatchNormCPU
    ):
        new = SyncBatchNormCPU(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert(child, device))
    return module
