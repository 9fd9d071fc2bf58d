"""BatchNorm1d with statistics over every rank's tokens (the query BN of the PEER router).

torch.nn.SyncBatchNorm runs on CUDA only, so this is one autograd Function over all_reduce:
forward reduces (sum, sum of squares, count) per channel, backward reduces (sum dxhat,
sum dxhat * xhat). The sums are taken in float64, so the one-pass variance is as accurate as
BatchNorm1d's two-pass one at these sizes. Training-mode output, input gradients and running
statistics equal nn.BatchNorm1d on the concatenated global batch (running_var uses the unbiased
variance with the global count); parameter gradients are local sums, which the data-parallel
average turns into the global-batch gradient.

Shape legend: T = local tokens, C = channels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        c = x.shape[1]
        x64 = x.double()
        stats = torch.cat([x64.sum(0), (x64 * x64).sum(0),
                           torch.full((1,), x.shape[0], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, group=group)  # (2C + 1,)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, for normalising
        invstd = torch.rsqrt(var + eps)
        xhat = ((x64 - mean) * invstd).to(x.dtype)  # (T, C)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.group, ctx.n = group, n
        y = xhat * weight + bias if weight is not None else xhat
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        xhat, weight, invstd = ctx.saved_tensors
        c = xhat.shape[1]
        dxhat = dy * weight if weight is not None else dy
        sums = torch.cat([dxhat.double().sum(0), (dxhat.double() * xhat.double()).sum(0)])
        dist.all_reduce(sums, group=ctx.group)  # over every rank's tokens
        mean_dxhat = (sums[:c] / ctx.n).to(dy.dtype)
        mean_dxhat_xhat = (sums[c:] / ctx.n).to(dy.dtype)
        dx = invstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        dw = (dy * xhat).sum(0) if weight is not None else None
        db = dy.sum(0) if weight is not None else None
        return dx, dw, db, None, None


class SyncBatchNorm1d(nn.Module):
    """Drop-in for nn.BatchNorm1d on (T, C) inputs; same parameter and buffer names."""

    def __init__(self, bn: nn.BatchNorm1d, group=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.group = group  # None = the whole world
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"SyncBatchNorm1d expects (tokens, channels), got shape "
                             f"{tuple(x.shape)}")
        use_batch = self.training or not self.track_running_stats
        if not use_batch:  # in fp32: under train.dtype=bf16 the statistics stay fp32
            f32 = torch.float32
            w, b = ((None, None) if self.weight is None
                    else (self.weight.to(f32), self.bias.to(f32)))
            return nn.functional.batch_norm(x.to(f32), self.running_mean.to(f32),
                                            self.running_var.to(f32), w, b, False, 0.0,
                                            self.eps).to(x.dtype)
        y, mean, var, n = _SyncBN.apply(x, self.weight, self.bias, self.eps, self.group)
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(n))
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased, alpha=m)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, synced"
