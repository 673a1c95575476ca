"""Step 5 of augmentation: paste the original subjects onto a draft where the draft drew them.

Each subject is cut from the reference with its mask and scaled (aspect kept) to fit the box of
its pseudo-mask in the draft, centred there. Where the draft's subject was bigger than the
paste, the draft's version would still show: that uncovered region, dilated, becomes the
inpaint mask (never reaching into a pasted subject), to be filled by masked denoising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import DynASynError


@dataclass
class Composed:
    image: torch.Tensor         # [H, W, 3] draft with the subjects pasted
    masks: torch.Tensor         # [S, H, W] where each pasted subject is visible (its pseudo-mask for training)
    inpaint_mask: torch.Tensor  # [H, W] 1 = to fill
    skipped: list[int]          # subjects whose pseudo-mask was empty or too small


def mask_box(mask: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the mask's pixels (end exclusive), or None when empty."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def found(pseudo_mask: torch.Tensor, min_pixels: int = 1) -> bool:
    """Whether a pseudo-mask shows its subject: at least ``min_pixels`` (and one) pixels above 0.5."""
    return int((pseudo_mask > 0.5).sum()) >= max(1, min_pixels)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask.float()
    return F.max_pool2d(mask.float()[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]


def _fit(src_h: int, src_w: int, box_h: int, box_w: int) -> tuple[int, int]:
    s = min(box_h / src_h, box_w / src_w)
    return max(1, round(src_h * s)), max(1, round(src_w * s))


def paste_subjects(draft: torch.Tensor, pseudo_masks: torch.Tensor, reference: torch.Tensor,
                   ref_masks: Sequence[torch.Tensor], *, dilation: int = 4, min_pixels: int = 16) -> Composed:
    """``draft`` [H, W, 3]; ``pseudo_masks`` [S, H, W] (draft's subjects); ``reference`` [h, w, 3]; ``ref_masks`` S x [h, w].

    A pseudo-mask with fewer than ``min_pixels`` pixels is skipped (reported, nothing pasted).
    """
    if draft.ndim != 3 or draft.shape[-1] != 3 or reference.ndim != 3 or reference.shape[-1] != 3:
        raise DynASynError("compose needs RGB images [H, W, 3] (one image, not a batch).")
    if len(pseudo_masks) != len(ref_masks):
        raise DynASynError(f"{len(pseudo_masks)} pseudo-masks for {len(ref_masks)} subjects: need one per subject.")
    H, W = draft.shape[:2]
    out = draft.clone().float()
    visible = torch.zeros(len(ref_masks), H, W)
    uncovered = torch.zeros(H, W)
    skipped = []
    for i, (pseudo, ref_mask) in enumerate(zip(pseudo_masks, ref_masks)):
        target, source = mask_box(pseudo), mask_box(ref_mask)
        if source is None:
            raise DynASynError(f"The reference mask of subject {i + 1} is empty.")
        if target is None or not found(pseudo, min_pixels):
            skipped.append(i)
            continue
        sy0, sy1, sx0, sx1 = source
        ty0, ty1, tx0, tx1 = target
        h, w = _fit(sy1 - sy0, sx1 - sx0, ty1 - ty0, tx1 - tx0)
        y0, x0 = ty0 + (ty1 - ty0 - h) // 2, tx0 + (tx1 - tx0 - w) // 2
        cut = reference[sy0:sy1, sx0:sx1].permute(2, 0, 1)[None].float()
        cut_mask = ref_mask[sy0:sy1, sx0:sx1][None, None].float()
        if (h, w) == (sy1 - sy0, sx1 - sx0):  # same size: the exact source pixels
            pixels, m = cut[0].permute(1, 2, 0), cut_mask[0, 0] > 0.5
        else:
            pixels = F.interpolate(cut, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].permute(1, 2, 0)
            m = F.interpolate(cut_mask, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
        region = out[y0:y0 + h, x0:x0 + w]
        region[m] = pixels[m]
        placed = torch.zeros(H, W, dtype=torch.bool)
        placed[y0:y0 + h, x0:x0 + w] = m
        visible[:i][:, placed] = 0  # a later paste hides what it covers
        visible[i] = placed.float()
        uncovered = torch.maximum(uncovered, (pseudo > 0.5).float())
    pasted = visible.amax(0) if len(visible) else torch.zeros(H, W)
    uncovered = uncovered * (1 - pasted)
    inpaint = dilate(uncovered, dilation) * (1 - pasted)
    return Composed(out.clamp(0, 1), visible, inpaint, skipped)
