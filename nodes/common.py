"""Small helpers shared by the pack's nodes (ComfyUI side)."""

from __future__ import annotations

import torch

from ..dynasyn.errors import DynASynError


def run_outside_inference_mode(fn, *args, **kwargs):
    """ComfyUI runs nodes under ``torch.inference_mode()``; training and conversion need it off."""
    with torch.inference_mode(False):
        return fn(*args, **kwargs)


def user_error(e: Exception) -> RuntimeError:
    """Wrap a library error so ComfyUI shows its message (no deep torch trace needed to understand it)."""
    if isinstance(e, DynASynError):
        return RuntimeError(f"DynASyn: {e}")
    return RuntimeError(f"DynASyn: {type(e).__name__}: {e}")
