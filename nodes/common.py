"""Small helpers shared by the pack's nodes (ComfyUI side)."""

from __future__ import annotations

from ..dynasyn.errors import DynASynError


def user_error(e: Exception) -> RuntimeError:
    """Wrap a library error so ComfyUI shows its message (no deep torch trace needed to understand it)."""
    if isinstance(e, DynASynError):
        return RuntimeError(f"DynASyn: {e}")
    return RuntimeError(f"DynASyn: {type(e).__name__}: {e}")
