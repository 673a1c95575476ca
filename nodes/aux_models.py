"""SAM and the zero-shot detector on the ComfyUI side: which module a SAM input carries (the pack's DYNASYN_SAM
or Impact Pack's SAM_MODEL), and the compute device only while a node uses them.

They are loaded on the CPU and moved to the device for one node's work, then back, with the device cache
emptied: a SAM (2.5 GB for vit_h) or a detector never sits on the GPU through training. Before the move,
ComfyUI's model management makes room (it offloads other models it holds when the device is short).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

import comfy.model_management as mm

from ..dynasyn.errors import DynASynError

OFFLOAD = torch.device("cpu")

SAM_INPUTS = {
    "sam": ("DYNASYN_SAM", {"tooltip": "SAM from DynASyn SAM Loader (or connect Impact Pack's SAMLoader to 'sam_model')."}),
    "sam_model": ("SAM_MODEL", {"tooltip": (
        "Impact Pack's SAMLoader output (a segment-anything SAM, e.g. sam_vit_b_01ec64.pth), instead of 'sam'. "
        "SAM-HQ, SAM 2 and ESAM models are not supported.")}),
}


def sam_module(sam=None, sam_model=None):
    """The segment-anything ``Sam`` module of whichever SAM input is connected, or None when neither is."""
    if sam is not None and sam_model is not None:
        raise DynASynError("Connect one SAM: 'sam' (DynASyn SAM Loader) or 'sam_model' (Impact Pack's SAMLoader), "
                           "not both.")
    if sam is not None:
        if not isinstance(sam, dict) or not isinstance(sam.get("model"), torch.nn.Module):
            raise DynASynError("The 'sam' input is not a DynASyn SAM Loader output.")
        return sam["model"]
    if sam_model is None:
        return None
    try:
        from segment_anything.modeling import Sam
    except ImportError:
        raise DynASynError("Using Impact Pack's SAM_MODEL needs the segment-anything package: "
                           "pip install segment-anything.") from None
    if not isinstance(sam_model, Sam):
        raise DynASynError(f"The SAM_MODEL connected is a {type(sam_model).__name__}, not a segment-anything SAM: "
                           "connect Impact Pack's SAMLoader with a sam_vit_b / l / h file, or DynASyn SAM Loader to "
                           "'sam'. SAM-HQ, SAM 2 and ESAM models are not supported.")
    return sam_model


@contextmanager
def used_on_device(*modules):
    """The modules (None entries skipped) on ComfyUI's compute device for the ``with`` body, then back on the CPU
    with the device cache emptied, whatever the body did (an error or Cancel included). Yields the device."""
    modules = [m for m in modules if m is not None]
    device = mm.get_torch_device()
    try:
        if modules and not mm.is_device_cpu(device):
            need = sum(mm.module_size(m) for m in modules)
            mm.free_memory(need * 1.2 + mm.minimum_inference_memory(), device)
        for m in modules:
            m.to(device)
        yield device
    finally:
        for m in modules:
            m.to(OFFLOAD)
        if modules:
            mm.soft_empty_cache()
