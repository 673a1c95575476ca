"""Optimizers for the trainer: AdamW, 8-bit AdamW, Adafactor, and the step fused into backward.

``fused_backward_step`` gives every trained tensor its own optimizer and steps it from a
post-accumulate-grad hook the moment its gradient is ready, then frees that gradient, so the
full set of fp32 gradients (4.8 GB for SD 2.x UNet + text encoder) never exists at once. The
price: no global gradient-norm clipping (there is never a moment with every gradient), and a
non-finite gradient found mid-backward can only skip that tensor's update, not the whole step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import DynASynError


def make_optimizer(params: Sequence[torch.Tensor], lr: float, cfg) -> torch.optim.Optimizer:
    """``cfg``: a TrainConfig (optimizer name, Adam betas, weight decay, epsilon)."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise DynASynError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                               "(or choose adamw / adafactor).") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        # beta1=None: no first moment, only the factored second moment (row + column statistics)
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.adam_weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


class FusedBackwardOptimizer:
    """One optimizer per tensor, stepped from its gradient hook during ``loss.backward()``.

    Looks like an optimizer to the trainer (``zero_grad``, ``step``, ``param_groups``,
    ``state_dict``); ``step`` does nothing because the updates already happened.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, cfg):
        self.params = list(params)
        self.optimizers = [make_optimizer([p], lr, cfg) for p in self.params]
        self.non_finite: list[int] = []
        self.enabled = True
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, index: int):
        def step_now(p: torch.Tensor) -> None:
            if not self.enabled:
                return
            if not torch.isfinite(p.grad).all():
                self.non_finite.append(index)  # skip this tensor; the trainer reports it after backward
            else:
                self.optimizers[index].step()
            p.grad = None
        return step_now

    @property
    def param_groups(self):
        return self.optimizers[0].param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.non_finite.clear()
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"fused": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if "fused" not in state or len(state["fused"]) != len(self.optimizers):
            raise DynASynError("The saved optimizer state was not made with fused_backward_step; resume with the "
                               "setting it was saved with.")
        for o, s in zip(self.optimizers, state["fused"]):
            o.load_state_dict(s)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
