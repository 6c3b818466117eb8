"""Data parallelism for the detector trainer under `accelerate launch`: the processes of a run
(`World`) and BatchNorm over the global batch (`sync_batchnorm`). Used by `engines.training.detector`
(whose docstring describes how a data-parallel step matches a one-process step).
"""
from __future__ import annotations

from typing import Callable

StopFn = Callable[[], bool]


def sync_batchnorm(model, device_type: str):
    """BatchNorm layers that normalise over the global batch of all processes: torch's SyncBatchNorm
    on CUDA, `GlooSyncBatchNorm` elsewhere (torch's refuses CPU tensors). Parameters and buffers are
    kept (the same objects), so the state dict and the saved checkpoint are unchanged."""
    import torch

    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.BatchNorm2d:
                sync = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
                sync.weight, sync.bias = child.weight, child.bias
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
                sync.train(child.training)
                setattr(module, name, sync)
    return model


def _gloo_sync_bn_class():
    import torch
    import torch.distributed as dist

    class AllReduceSum(torch.autograd.Function):
        """Sum over the processes; the gradient is summed the same way (every process's loss depends on
        every process's input through the shared statistics)."""

        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    class _GlooSyncBatchNorm(torch.nn.BatchNorm2d):
        """BatchNorm2d whose training statistics are the global batch's: per-channel sums, sums of squares
        and counts are all-reduced (differentiably) across the processes, then normalised as BatchNorm2d
        does (biased variance for the output, unbiased for the running estimate). In eval mode it is
        BatchNorm2d."""

        def forward(self, x):
            if not self.training:
                return super().forward(x)
            c = x.shape[1]
            count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
            stats = AllReduceSum.apply(torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count]))
            n = stats[-1]
            mean = stats[:c] / n
            var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                    self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
            if self.affine:
                y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
            return y

    return _GlooSyncBatchNorm


def GlooSyncBatchNorm(*args, **kwargs):  # noqa: N802 - a class made on first use (torch is imported lazily)
    """A `_GlooSyncBatchNorm` (see `_gloo_sync_bn_class`); built lazily so importing this module needs no torch."""
    global _GLOO_SYNC_BN
    if _GLOO_SYNC_BN is None:
        _GLOO_SYNC_BN = _gloo_sync_bn_class()
    return _GLOO_SYNC_BN(*args, **kwargs)


_GLOO_SYNC_BN = None


class World:
    """The processes of a run: one (accelerator None) or those of an `accelerate.Accelerator`."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.size = int(accelerator.num_processes) if accelerator is not None else 1
        self.is_main = accelerator is None or bool(accelerator.is_main_process)

    def sum(self, tensor):
        import torch.distributed as dist

        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def stop(self, should_stop: StopFn | None) -> bool:
        """should_stop() of the main process, the same answer on every process."""
        wants = self.is_main and should_stop is not None and bool(should_stop())
        if self.size == 1:
            return wants
        if wants:
            self.accelerator.set_trigger()
        return bool(self.accelerator.check_trigger())
