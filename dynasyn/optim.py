"""Optimizers for the trainer: AdamW, 8-bit AdamW, Adafactor, and the step fused into backward.

``fused_backward_step`` gives every trained tensor its own optimizer and steps it from a
post-accumulate-grad hook the moment its gradient is ready, then frees that gradient, so the
full set of fp32 gradients (4.8 GB for SD 2.x UNet + text encoder) never exists at once. The
price: no global gradient-norm clipping (there is never a moment with every gradient), and a
non-finite gradient found mid-backward can only skip that tensor's update (and every later one), not the
whole step.

No host sync per tensor: finiteness is accumulated on the device into one flag per step (seeded with the
loss's own finiteness, so a non-finite loss applies nothing), and each update is skipped on the device
when the flag is set: fused AdamW takes the flag as ``found_inf`` (its kernel skips the update), any
other optimizer's update is undone with ``torch.where`` from a copy of that one tensor and its state.
The trainer reads the flag once, after backward.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .errors import DynASynError


@functools.cache
def fused_adamw_on(device_type: str) -> bool:
    """Whether the trainer uses torch's fused AdamW kernel on ``device_type``: always on CUDA, on the CPU where this
    torch has the kernel (2.4 and newer; older ComfyUI installs step unfused there). Other devices step unfused."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:  # torch before 2.4 refuses fused=True for CPU tensors when the optimizer is built
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


def make_optimizer(params: Sequence[torch.Tensor], lr: float, cfg, fused: bool | None = None) -> torch.optim.Optimizer:
    """``cfg``: a TrainConfig (optimizer name, Adam betas, weight decay, epsilon).

    AdamW is the fused single-kernel version on CUDA and on the CPU (``fused`` None = when every tensor is on one
    of them): on CUDA the default foreach path holds a second copy of the weights during each step; on the CPU
    the default per-tensor path takes 3-4x as long (bench/optimizer_step.py).
    """
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise DynASynError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                               "(or choose adamw / adafactor).") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adafactor":
        # beta1=None: no first moment, only the factored second moment (row + column statistics)
        return factored_adafactor(params, lr=lr, weight_decay=cfg.adam_weight_decay)
    params = list(params)
    if fused is None:
        fused = bool(params) and len({p.device.type for p in params}) == 1 and fused_adamw_on(params[0].device.type)
    kw = dict(fused=True) if fused else {}
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **kw)


def factor_dims(shape: Sequence[int]) -> tuple[int, ...]:
    """The permutation that puts a tensor's two largest dimensions last, in their order (stable for ties).

    Adafactor keeps row and column statistics of the last two dimensions and full statistics of the others.
    transformers' Adafactor factors the last two as they come, which for a 3x3 convolution (out, in, 3, 3)
    means statistics of shape (out, in, 3) twice: two thirds of the weight's size, 1.5 GiB for SD 2.x's UNet.
    The reference implementations (tensor2tensor, optax) factor the two largest dimensions instead:
    (3, 3, out) + (3, 3, in), a few hundred KB.
    """
    if len(shape) <= 2:
        return tuple(range(len(shape)))
    big = sorted(sorted(range(len(shape)), key=lambda d: -shape[d])[:2])
    return tuple(d for d in range(len(shape)) if d not in big) + tuple(big)


def factored_adafactor(params: Sequence[torch.Tensor], lr: float, weight_decay: float = 0.0):
    """transformers' Adafactor (fixed learning rate, no first moment), factoring each tensor's two largest
    dimensions (``factor_dims``)."""
    return _factored_adafactor_class()(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                                       weight_decay=weight_decay)


_FACTORED_ADAFACTOR = None


def _factored_adafactor_class():
    global _FACTORED_ADAFACTOR
    if _FACTORED_ADAFACTOR is not None:
        return _FACTORED_ADAFACTOR
    from transformers.optimization import Adafactor

    class FactoredAdafactor(Adafactor):
        """Holds the trained tensors (so GradScaler, clipping and zero_grad see their gradients, and the state is
        keyed by them); only inside ``step`` does transformers' update run on views of them with the two
        largest dimensions last. The views share the tensors' storage: the updates land in the tensors."""

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            kept, pairs = [], []
            for group in self.param_groups:
                kept.append(group["params"])
                views = []
                for p in group["params"]:
                    v = p.detach().permute(factor_dims(p.shape))
                    v.grad = None if p.grad is None else p.grad.permute(factor_dims(p.shape))
                    if p in self.state:
                        self.state[v] = self.state.pop(p)
                    views.append(v)
                    pairs.append((p, v))
                group["params"] = views
            try:
                super().step()
            finally:
                for group, params in zip(self.param_groups, kept):
                    group["params"] = params
                for p, v in pairs:
                    v.grad = None
                    if v in self.state:
                        self.state[p] = self.state.pop(v)
            return loss

        def load_state_dict(self, state_dict):
            params = [p for g in self.param_groups for p in g["params"]]
            for i, p in enumerate(params):  # an older layout's statistics would fail deep inside the step
                row = state_dict.get("state", {}).get(i, {}).get("exp_avg_sq_row")
                want = tuple(p.permute(factor_dims(p.shape)).shape[:-1])
                if row is not None and tuple(row.shape) != want:
                    raise DynASynError("This run's Adafactor state was saved by an older version (statistics of "
                                       f"shape {tuple(row.shape)}, now {want}); it cannot be resumed: turn resume "
                                       "off or choose another run_name to train again.")
            super().load_state_dict(state_dict)

    _FACTORED_ADAFACTOR = FactoredAdafactor
    return FactoredAdafactor


def _takes_found_inf(opt) -> bool:
    """Whether ``step`` runs the fused kernel, which honours ``found_inf``. Read from the parameter groups, which
    ``load_state_dict`` replaces: a state saved by an unfused AdamW (a CPU run before the CPU got the fused
    kernel) steps unfused after resuming, and an unfused step handed the flag raises inside the backward hook."""
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and all(g.get("fused") for g in opt.param_groups)


class FusedBackwardOptimizer:
    """One optimizer per tensor, stepped from its gradient hook during ``loss.backward()``.

    Looks like an optimizer to the trainer (``zero_grad``, ``step``, ``param_groups``,
    ``state_dict``); ``step`` does nothing because the updates already happened. Call ``begin(loss)``
    before ``loss.backward()``; ``found_inf`` is then a device flag, true when the loss or any gradient
    was non-finite (the tensors from the first bad one on were not updated).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, cfg, fused: bool | None = None):
        self.params = list(params)
        self.optimizers = [make_optimizer([p], lr, cfg, fused=fused) for p in self.params]
        self.found_inf: torch.Tensor | None = None
        self.enabled = True
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def begin(self, loss: torch.Tensor) -> None:
        self.found_inf = ~torch.isfinite(loss.detach()).reshape(())

    def _hook(self, index: int):
        def step_now(p: torch.Tensor) -> None:
            if not self.enabled:
                return
            bad = ~torch.isfinite(p.grad).all()
            self.found_inf = bad if self.found_inf is None else self.found_inf | bad
            self._step_unless(self.optimizers[index], p, self.found_inf)
            p.grad = None
        return step_now

    @staticmethod
    @torch.no_grad()
    def _step_unless(opt, p: torch.Tensor, skip: torch.Tensor) -> None:
        """``opt.step()`` unless the device flag ``skip`` is set, without reading it on the host."""
        if _takes_found_inf(opt):
            opt.found_inf = skip.float()  # the fused kernel leaves weights, moments and step count as they were
            try:
                opt.step()
            finally:
                del opt.found_inf
            return
        state = opt.state.get(p, {})
        before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        old = p.detach().clone()
        opt.step()
        torch.where(skip, old, p, out=p)  # elementwise in place: no third copy of the largest tensor
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.device == p.device:  # state made by this first step goes back to zero
                v.copy_(torch.where(skip, before[k] if k in before else torch.zeros_like(v), v))
        # Host-side counts (Adafactor's int state["step"], 8-bit AdamW's) still advance on a skipped update: undoing
        # them here would read the flag on the host for every tensor. A skipped update always ends the run
        # (NonFiniteLoss), so only a run resumed from the optimizer state kept then sees one count too many: for
        # Adafactor, its second-moment decay 1 - t^-0.8 is 1.4 % higher at step 10 and 0.02 % at step 100.

    @property
    def param_groups(self):
        return self.optimizers[0].param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.found_inf = None
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
