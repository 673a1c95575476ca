"""Device facts the trainer decides from: precision, random generators, out-of-memory errors.

Every decision is a plain function of the device and its compute capability, so it is tested on a
CPU with the capability given by hand.
"""

from __future__ import annotations

import torch

from .errors import DynASynError

PRECISIONS = ("auto", "no", "fp16", "bf16")

# torch.OutOfMemoryError exists from torch 2.5; older torch (many ComfyUI installs) raises torch.cuda.OutOfMemoryError
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e is not None})
# what torch says when an allocation fails without its OOM type: older CUDA builds, the CPU and MPS allocators
_OOM_TEXT = ("out of memory", "can't allocate memory", "failed to allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host allocation failure: torch's OOM types, or a RuntimeError that says so."""
    return isinstance(e, OOM_ERRORS) or (isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT))


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def resolve_mixed_precision(requested: str, device: torch.device | str, capability: tuple[int, int] | None = None,
                            fused_backward_step: bool = False) -> tuple[str, str | None]:
    """``(precision, note)``: the autocast precision the trainer uses (no | fp16 | bf16) and why, if not as asked.

    ``auto``: bf16 on CUDA cards with native bf16 (compute capability >= 8.0, Ampere and newer); fp16 with a
    loss scaler on older cards (they emulate bf16, slowly); no autocast on CPU / MPS. fp16 needs a loss scaler,
    which cannot skip a whole step once ``fused_backward_step`` has applied part of it: that pair is refused
    when asked for, and ``auto`` picks fp32 there instead.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise DynASynError(f"Unknown mixed_precision {requested!r}; choose one of {', '.join(PRECISIONS)}.")
    native_bf16 = capability is not None and capability >= (8, 0)
    if requested == "auto":
        if device.type != "cuda":
            return "no", None
        if native_bf16:
            return "bf16", None
        if fused_backward_step:
            return "no", (f"compute capability {capability[0]}.{capability[1]} has no native bf16 and fp16 needs a loss "
                          "scaler, which fused_backward_step cannot use: training in fp32.")
        return "fp16", f"compute capability {capability[0]}.{capability[1]} has no native bf16: fp16 with loss scaling."
    if requested == "fp16" and fused_backward_step:
        raise DynASynError("mixed_precision fp16 needs loss scaling, which skips a whole step on overflow; with "
                           "fused_backward_step part of the step is already applied. Use bf16 (Ampere or newer), 'no', "
                           "or turn fused_backward_step off.")
    if requested == "bf16" and device.type == "cuda" and capability is not None and not native_bf16:
        return "bf16", (f"compute capability {capability[0]}.{capability[1]} emulates bf16 (slow); fp16 (with loss "
                        "scaling) is faster on this card.")
    return requested, None


def noise_generator(device: torch.device, seed: int) -> torch.Generator:
    """Noise and timesteps are drawn where they are used: a CUDA generator on CUDA (no host-to-device copy per
    step), the CPU generator elsewhere (CPU results stay those of earlier versions)."""
    if device.type == "cuda":
        return torch.Generator(device=device).manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)


def enable_gradient_checkpointing(unet, text_encoder) -> None:
    """Non-reentrant activation checkpointing in the UNet and the text encoder.

    The reentrant kind (transformers 4.x's default) runs a nested backward per checkpointed block: under
    ``fused_backward_step`` a text-encoder tensor's gradient hook then fires (and steps) more than once per
    iteration, and tensors recorded inside a block (the captured attention maps) lose their graph.
    transformers >= 5 names the switch ``activation_checkpointing_enable``; 4.35+ ``gradient_checkpointing_enable``.
    """
    import functools
    import inspect

    from torch.utils.checkpoint import checkpoint

    kw = {"use_reentrant": False}
    if "gradient_checkpointing_func" in inspect.signature(unet.enable_gradient_checkpointing).parameters:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(checkpoint, **kw))
    else:  # diffusers < 0.32 checkpoints its blocks non-reentrantly by itself
        unet.enable_gradient_checkpointing()
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# glibc's mallopt parameter number; 128 KiB is its default starting threshold
_M_MMAP_THRESHOLD = -3
RELEASE_THRESHOLD = 128 * 1024


def release_freed_host_memory() -> bool:
    """Make glibc give every freed block over 128 KiB straight back to the OS (a fixed mmap threshold).

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so a training
    step's many per-tensor temporaries of 1-60 MB come from the heap afterwards, and the holes they leave are
    never returned: on the CPU that fragmentation held ~1.9 GiB of SD 2.1's low-memory step (bench/
    train_memory.py). Process-wide and lasting (mallopt cannot restore the sliding threshold); the price is a
    page fault per fresh large block. False where it does not apply (not glibc).
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, RELEASE_THRESHOLD))
    except (OSError, AttributeError):
        return False
