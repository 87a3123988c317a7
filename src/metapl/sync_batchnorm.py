"""BatchNorm over the whole global batch of a data-parallel run, with every derivative MPL needs.

``torch.nn.SyncBatchNorm`` computes the statistics of all processes' shards, but it runs on CUDA
only and has no forward-mode derivative, which the exact MPL step needs for its JVP (the tangents
of the global statistics are sums over all processes too). :class:`GlobalBatchNorm` is built from
ordinary differentiable ops plus one collective with all three derivatives (:class:`_AllReduceSum`:
forward, backward, JVP), so it works with gloo and NCCL, with autograd, forward AD and the tangent
tape, and N processes then compute exactly what one process computes on the concatenated batch.

Statistics are two-pass (the global mean first, then the global mean of squared deviations from
it): two small all-reduces per layer and forward pass, and the same again in the backward, in
exchange for the variance's accuracy when activations have a large mean. Outside a process group
of two or more, and whenever the running statistics are used (eval mode), it is ``BatchNorm``.

Every process must run the same forward passes in the same order (a pass on one rank only would
wait forever for the others): metapl's training runs do; evaluation runs in eval mode, which
involves no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metapl.errors import ConfigError


class _AllReduceSum(torch.autograd.Function):
    """``sum over processes of x``, on every process. Its derivatives are sums too: the backward
    sums the gradients every process's output received, the JVP sums the tangents."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _group):
        total = tangent.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Differentiable (reverse and forward mode) sum of ``x`` over the processes of ``group``."""
    return _AllReduceSum.apply(x, group)


def _world_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d, 2d or 3d: any input ``[N, C, ...]``) whose batch statistics, and their
    derivatives, cover every process's shard. Same parameters, buffers and state dict as
    ``BatchNorm``; running statistics are updated with the global batch's mean and unbiased
    variance, so they stay equal on every process."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats or _world_size(self.process_group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Low-precision inputs (autocast) are normalized in float32, as BatchNorm's kernels do.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        local = x.numel() // x.shape[1]
        count = torch.full((1,), local, dtype=xf.dtype, device=x.device)
        sums = all_reduce_sum(torch.cat([xf.sum(dims), count]), self.process_group)
        total = sums[-1]
        # BatchNorm's own check, over the global batch (a host sync only when it can fail)
        if local <= 1 and float(total) <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {x.shape}")
        mean = sums[:-1] / total
        centered = xf - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims), self.process_group) / total
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: Tensor) -> None:
        """What ``F.batch_norm`` does: momentum (or a cumulative average for ``momentum=None``)
        towards the batch mean and the *unbiased* batch variance."""
        factor = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        if factor is None:  # momentum=None without a counter: nothing to average with
            factor = 0.0
        unbiased = var * (total / (total - 1))
        # called only when track_running_stats, for which BatchNorm registers both buffers
        assert self.running_mean is not None and self.running_var is not None
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_global_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Swap, in place, every BatchNorm below ``model`` for a :class:`GlobalBatchNorm` that holds
    the *same* parameter and buffer objects (optimizers, EMA and checkpoints keep working).
    Returns ``model``. A model that is itself a BatchNorm cannot be swapped in place."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ConfigError("convert_global_batchnorm swaps BatchNorm children; wrap the model first")
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, GlobalBatchNorm
        ):
            setattr(model, name, _global_copy(child, process_group))
        else:
            convert_global_batchnorm(child, process_group)
    return model


def _global_copy(bn: nn.modules.batchnorm._BatchNorm, process_group) -> GlobalBatchNorm:
    new = GlobalBatchNorm(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        process_group=process_group,
        device=torch.device("meta"),  # no throwaway allocations: everything is replaced below
    )
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new
