"""The whole augmentation stage in one call (the standalone library path):

    templates -> drafts with pseudo-masks -> paste the real subjects -> inpaint the gaps -> GSA -> pairs

Each pair is (GSA image, class-noun prompt ĉ_a, per-subject pseudo-masks) as the trainer wants.
A draft where a subject was not found (empty or tiny pseudo-mask) is skipped and counted.
``progress(k, K, prompt, latest augmented image or None)`` is called before each prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .compose import paste_subjects
from .dataset import AugmentedPair
from .drafts import pseudo_masks, render_draft
from .errors import DynASynError
from .gsa import GSAConfig, guided_sde_augment, masked_inpaint
from .models import SDComponents
from .prompts import PromptTemplate


@dataclass
class AugmentConfig:
    size: int = 512                  # drafts and augmented images are size x size
    draft_steps: int = 25
    inpaint_steps: int = 20
    inpaint_dilation: int = 8
    min_mask_pixels: int = 64
    attention_threshold: float = 0.5
    guidance_scale: float = 7.5
    seed: int = 0
    gsa: GSAConfig = field(default_factory=GSAConfig)


@dataclass
class AugmentReport:
    pairs: list[AugmentedPair]
    drafts: list[torch.Tensor]
    skipped: list[tuple[int, str]]   # (template index, why)
    unet_evaluations: int = 0
    seconds: float = 0.0


def augment(comps: SDComponents, reference: torch.Tensor, ref_masks: Sequence[torch.Tensor], class_nouns: Sequence[str],
            descriptions: Sequence[str], templates: Sequence[PromptTemplate], cfg: AugmentConfig | None = None, *, sam=None,
            device="cpu", progress: Callable[[int, int, str, torch.Tensor | None], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> AugmentReport:
    cfg = cfg or AugmentConfig()
    n = len(class_nouns)
    if len(ref_masks) != n or len(descriptions) != n:
        raise DynASynError(f"{len(ref_masks)} masks, {len(descriptions)} descriptions and {n} class nouns: "
                           "give one of each per subject.")
    if not templates:
        raise DynASynError("No prompts to augment with (K = 0).")
    started = time.time()
    report = AugmentReport([], [], [])
    size = (cfg.size, cfg.size)
    for k, template in enumerate(templates):
        if should_stop and should_stop():
            break
        if progress:
            latest = report.pairs[-1].image if report.pairs else None  # for a preview
            progress(k, len(templates), template.render(descriptions), latest)
        seed = cfg.seed + k
        draft = render_draft(comps, template, descriptions,
                             GSAConfig(steps=cfg.draft_steps, guidance_scale=cfg.guidance_scale, seed=seed), size, device)
        report.drafts.append(draft.image)
        report.unet_evaluations += cfg.draft_steps
        pseudo = pseudo_masks(draft, n, sam, cfg.attention_threshold)
        composed = paste_subjects(draft.image, pseudo, reference, ref_masks, dilation=cfg.inpaint_dilation,
                                  min_pixels=cfg.min_mask_pixels)
        if composed.skipped:
            report.skipped.append((k, "no pseudo-mask for " + ", ".join(class_nouns[i] for i in composed.skipped)))
            continue
        image = composed.image
        if composed.inpaint_mask.sum() > 0:
            image, info = masked_inpaint(comps, image, composed.inpaint_mask, draft.prompt,
                                         GSAConfig(strength=1.0, steps=cfg.inpaint_steps, guidance_scale=cfg.guidance_scale,
                                                   seed=seed), device=device)
            report.unet_evaluations += info["unet_evaluations"]
        inpainted = bool(composed.inpaint_mask.sum() > 0)
        gsa_cfg = GSAConfig(**{**cfg.gsa.__dict__, "seed": seed})
        image, info = guided_sde_augment(comps, image, draft.prompt, gsa_cfg, device=device)
        report.unet_evaluations += info["unet_evaluations"]
        order = template.subjects
        masks = composed.masks[order]
        masks = torch.nn.functional.interpolate(masks[:, None], size=image.shape[:2], mode="nearest")[:, 0]
        report.pairs.append(AugmentedPair(image, template.render(class_nouns), list(order), masks,
                                          {"seed": seed, "template": template.text, "prompt": draft.prompt,
                                           "start_timestep": info["start_timestep"], "inpainted": inpainted}))
    report.seconds = time.time() - started
    return report
