"""DynASyn Subject Masks: up to 8 single MASKs -> one MASK batch, one mask per subject."""

from __future__ import annotations

import torch

from ..dynasyn.errors import DynASynError
from .common import user_error


class DynASynMaskBatch:
    DESCRIPTION = ("Collects one MASK per subject (e.g. painted in LoadImage's mask editor or loaded with LoadImageMask) "
                   "into the MASK batch DynASyn Train expects, in subject order. All masks must have the same size.")
    CATEGORY = "DynASyn/masks"
    FUNCTION = "batch"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("masks",)
    OUTPUT_TOOLTIPS = ("A batch of N masks, subject 1 first.",)

    @classmethod
    def INPUT_TYPES(cls):
        opt = {f"mask_{i}": ("MASK", {"tooltip": f"Mask of subject {i} (optional)."}) for i in range(2, 9)}
        return {"required": {"mask_1": ("MASK", {"tooltip": "Mask of subject 1."})}, "optional": opt}

    def batch(self, mask_1, **more):
        try:
            masks = [mask_1] + [more[f"mask_{i}"] for i in range(2, 9) if more.get(f"mask_{i}") is not None]
            masks = [m if m.ndim == 3 else m[None] for m in masks]
            sizes = {tuple(m.shape[-2:]) for m in masks}
            if len(sizes) > 1:
                raise DynASynError(f"The masks have different sizes {sorted(sizes)}; make every mask from the same image.")
            return (torch.cat([m[:1].float() for m in masks]),)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
