"""Data parallelism through ``accelerate``: what the trainer needs from it, and nothing when alone.

Under ``accelerate launch --num_processes N`` every process draws its own subject subset, noise and
timestep (seed + rank) and the gradients are averaged before each optimizer step, so all processes
keep identical weights (checked at the end). Gradients are all-reduced by hand rather than through
DDP because the set of trainable tensors changes between phase 1 (token rows) and phase 2 (everything),
and the attention-only passes leave most UNet weights without a gradient.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import DynASynError


class Distributed:
    """``accelerator`` is an ``accelerate.Accelerator`` or None (one process, no torch.distributed)."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, requested) -> torch.device:
        if self.accelerator is not None and requested is None:
            return self.accelerator.device
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Mean of every process's gradients, flattened into one all-reduce per dtype."""
        if not self.active:
            return
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:  # a tensor unused on this process still takes part in the mean
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        from accelerate.utils import reduce
        return reduce(value.detach().reshape(-1), "mean").reshape(value.shape)

    def any(self, flag: bool, device) -> bool:
        """True on every process when ``flag`` is true on any (so Cancel stops all of them together)."""
        if not self.active:
            return flag
        from accelerate.utils import reduce
        return bool(reduce(torch.tensor([float(flag)], device=device), "sum").item() > 0)

    def gather(self, obj: Any) -> list:
        if not self.active:
            return [obj]
        from accelerate.utils import gather_object
        return gather_object([obj])

    def wait(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()

    def check_in_sync(self, modules: Sequence[torch.nn.Module]) -> None:
        """Every process must end with the same weights; a mismatch means a lost gradient update."""
        if not self.active:
            return
        checksum = [float(sum(p.detach().double().sum().item() for p in m.parameters())) for m in modules]
        sums = self.gather(checksum)
        if any(s != sums[0] for s in sums):
            raise DynASynError(f"The {self.world} training processes ended with different weights ({sums}).")
