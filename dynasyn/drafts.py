"""Step 4 of augmentation: draft images of the augmented prompts, with a pseudo-mask per subject.

A draft is rendered from the prompt written with the subjects' descriptions; the cross-attention
of each subject's words at the 16x16 layers, averaged over the sampling steps, says where the
model drew it. Its peak region becomes a box + point prompt for SAM (default), or, without SAM,
the thresholded map itself is the pseudo-mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionStore, capture_layers, install_attention_capture, remove_attention_capture, token_maps
from .compose import mask_box
from .errors import DynASynError
from .gsa import GSAConfig, denoise
from .models import SDComponents
from .prompts import PromptTemplate
from .sam import SubjectPrompt, segment
from .subjects import token_positions


class SamplingAttention(AttentionStore):
    """Sums the conditional sample's head/layer-averaged maps over the sampling steps."""

    def __init__(self):
        super().__init__()
        self.total: torch.Tensor | None = None
        self.steps = 0

    def accumulate(self) -> None:
        maps = self.aggregate()[-1].float()  # [r, r, T]; the batch is [uncond, cond]
        self.total = maps if self.total is None else self.total + maps
        self.steps += 1
        self.clear()

    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.steps)


@dataclass
class Draft:
    image: torch.Tensor                 # [H, W, 3]
    template: PromptTemplate
    prompt: str                         # rendered with the descriptions
    attention: torch.Tensor             # [S, r, r] per subject, in template order of subjects
    phrases: list[str] = field(default_factory=list)  # each subject's description, in the same order
    before: list[str] = field(default_factory=list)   # the prompt's text before each of them (template markers)


def draft_positions(tokenizer, template: PromptTemplate, descriptions: Sequence[str]) -> list[list[int]]:
    """Token positions of each subject's description in the draft prompt, in template order, found from the
    template's markers: a description that also names a prop earlier in the prompt ("a ball next to a box, the
    [1] jumping") is read where its marker stands, never at the prop."""
    return token_positions(tokenizer, template.render(descriptions), [descriptions[i] for i in template.subjects],
                           template.before_markers(descriptions))


def render_draft(comps: SDComponents, template: PromptTemplate, descriptions: Sequence[str], cfg: GSAConfig,
                 size: tuple[int, int], device="cpu", callback=None) -> Draft:
    prompt = template.render(descriptions)
    latent = size[0] // comps.vae_scale_factor
    store = SamplingAttention()
    install_attention_capture(comps.unet, store, capture_layers(comps.unet, latent, 16))
    try:
        image, _ = denoise(comps, None, prompt, cfg, size=size, device=device, attention=store, callback=callback)
    finally:
        remove_attention_capture(comps.unet)
    return Draft(image, template, prompt, token_maps(store.mean(), draft_positions(comps.tokenizer, template, descriptions)),
                 [descriptions[i] for i in template.subjects], template.before_markers(descriptions))


def attention_prompt(attn: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> tuple[SubjectPrompt, torch.Tensor]:
    """Box around the region above ``threshold`` x peak, the peak as a point; and that region as a mask."""
    up = F.interpolate(attn[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    region = (up >= threshold * up.max()).float() if up.max() > 0 else torch.zeros(size)
    y0, y1, x0, x1 = mask_box(region) or (0, size[0], 0, size[1])
    peak = int(torch.argmax(up))
    py, px = divmod(peak, size[1])
    return SubjectPrompt(box=(x0, y0, x1, y1), points=[(px, py)], labels=[1]), region


def pseudo_masks(draft: Draft, num_subjects: int, sam=None, threshold: float = 0.5, detector=None) -> torch.Tensor:
    """[N, H, W]: SAM on the attention peaks (or the thresholded attention without SAM), by subject index.

    With a ``detector`` (``grounding.Detector``), a subject it finds by its description gets the
    detected box instead of the attention box (and, without SAM, the attention region inside it,
    or the whole box when none is).
    """
    H, W = draft.image.shape[:2]
    prompts, regions = (list(x) for x in zip(*(attention_prompt(a, (H, W), threshold) for a in draft.attention)))
    if detector is not None:
        from .grounding import detect

        for k, box in enumerate(detect(detector, draft.image, draft.phrases)):
            if box is None:
                continue
            x0, y0, x1, y1 = box
            inside = [(x, y) for x, y in prompts[k].points if x0 <= x < x1 and y0 <= y < y1]
            prompts[k] = SubjectPrompt(box=box, points=inside, labels=[1] * len(inside))
            in_box = torch.zeros(H, W)
            in_box[y0:y1, x0:x1] = 1
            regions[k] = regions[k] * in_box if (regions[k] * in_box).sum() > 0 else in_box
    masks = segment(sam, draft.image, prompts) if sam is not None else torch.stack(regions)
    out = torch.zeros(num_subjects, H, W)
    for k, subject in enumerate(draft.template.subjects):
        out[subject] = masks[k]
    return out


def inner_point(mask: torch.Tensor) -> tuple[int, int] | None:
    """(x, y) of the mask's innermost pixel (the last to go under repeated 3x3 erosion), or None when empty."""
    m = (mask > 0.5).float()
    if m.sum() == 0:
        return None
    while True:
        eroded = -F.max_pool2d(-m[None, None], 3, stride=1, padding=1)[0, 0]
        if eroded.sum() == 0:
            break
        m = eroded
    ys, xs = torch.nonzero(m, as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    k = int(torch.argmin((ys - cy) ** 2 + (xs - cx) ** 2))  # the survivor nearest their centre
    return int(xs[k]), int(ys[k])


def resegment(image: torch.Tensor, pasted: torch.Tensor, sam=None, attention: torch.Tensor | None = None,
              threshold: float = 0.5, margin: float = 0.15, min_pixels: int = 1) -> tuple[torch.Tensor, list[int]]:
    """Pseudo-masks of the subjects in the GSA output, which GSA moved away from the pasted silhouettes.

    ``pasted`` [S, H, W] are the pasted masks; each one's box (grown by ``margin`` of its size on each
    side) and innermost point prompt SAM. Without SAM, ``attention`` [S, r, r] (each subject's
    cross-attention during the GSA pass) thresholded at ``threshold`` x peak, as for drafts, kept inside
    that box. Returns the masks [S, H, W] and the subjects (indices into ``pasted``) for which nothing
    was found and the pasted mask was kept.
    """
    H, W = image.shape[:2]
    S = pasted.shape[0]
    boxes = []
    for m in pasted:
        y0, y1, x0, x1 = mask_box(m) or (0, H, 0, W)
        dy, dx = round((y1 - y0) * margin), round((x1 - x0) * margin)
        boxes.append((max(0, x0 - dx), max(0, y0 - dy), min(W, x1 + dx), min(H, y1 + dy)))
    if sam is not None:
        prompts = []
        for m, box in zip(pasted, boxes):
            point = inner_point(m)
            prompts.append(SubjectPrompt(box=box, points=[point] if point else [], labels=[1] if point else []))
        found = segment(sam, image, prompts)
    elif attention is not None:
        if attention.shape[0] != S:
            raise DynASynError(f"{attention.shape[0]} attention maps for {S} subjects: one per subject.")
        found = torch.zeros(S, H, W)
        for k, (attn, (x0, y0, x1, y1)) in enumerate(zip(attention, boxes)):
            region = attention_prompt(attn, (H, W), threshold)[1]
            in_box = torch.zeros(H, W)
            in_box[y0:y1, x0:x1] = 1
            found[k] = region * in_box
    else:
        return pasted.clone().float(), list(range(S))
    out, kept = found.float(), []
    for k in range(S):
        if int((out[k] > 0.5).sum()) < min_pixels:
            out[k] = pasted[k].float()
            kept.append(k)
    return out, kept
