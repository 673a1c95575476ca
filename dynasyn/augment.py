"""The whole augmentation stage in one call, written once for every sampler backend:

    templates -> drafts with pseudo-masks -> paste the real subjects -> inpaint the gaps -> GSA -> pairs

Each pair is (GSA image, class-noun prompt ĉ_a, per-subject pseudo-masks) as the trainer wants; the
pseudo-masks are re-segmented on the GSA output (SAM prompted by each pasted mask's box and inner
point; without SAM, the GSA pass's own cross-attention, thresholded), and both those and the pasted
masks stay in the pair's meta (``cfg.pseudo_masks`` picks which one trains).
A draft where a subject was not found (empty or tiny pseudo-mask) is skipped and counted.
The sampling is a ``Renderer``: ``DiffusersRenderer`` here (the standalone library path); the
ComfyUI nodes pass one that samples the native MODEL with ComfyUI's own sampler. Drafts are
rendered ``draft_batch`` at a time; prompt k always uses seed + k, whatever the batch.
``progress(k, K, prompt, latest augmented image or None)`` is called before each prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .compose import paste_subjects
from .dataset import AugmentedPair
from .attention import capture_layers, install_attention_capture, remove_attention_capture, token_maps
from .drafts import Draft, SamplingAttention, pseudo_masks, render_draft, resegment
from .errors import DynASynError
from .gsa import GSAConfig, guided_sde_augment, masked_inpaint
from .models import SDComponents
from .prompts import PromptTemplate
from .subjects import token_positions


PSEUDO_MASKS = ("resegmented", "pasted")


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
    draft_batch: int = 4             # drafts sampled together (same images as one at a time)
    pseudo_masks: str = "resegmented"  # L_AUG's masks: re-segmented on the GSA output, or "pasted" (before GSA)
    gsa: GSAConfig = field(default_factory=GSAConfig)


@dataclass
class AugmentReport:
    pairs: list[AugmentedPair]
    drafts: list[torch.Tensor]
    skipped: list[tuple[int, str]]   # (template index, why)
    unet_evaluations: int = 0
    seconds: float = 0.0


class Renderer(Protocol):
    """The three sampling jobs of the stage; every image is [H, W, 3] in [0, 1]."""

    def drafts(self, templates: Sequence[PromptTemplate], descriptions: Sequence[str], seeds: Sequence[int],
               size: tuple[int, int]) -> list[Draft]: ...

    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, prompt: str, seed: int) -> tuple[torch.Tensor, int]: ...

    def gsa(self, image: torch.Tensor, prompt: str, seed: int, phrases: Sequence[str] | None = None
            ) -> tuple[torch.Tensor, dict]:
        """With ``phrases``, info["attention"] is each phrase's cross-attention [S, r, r] averaged over the pass."""


class DiffusersRenderer:
    """The library's own sampling loops (``gsa.denoise``) on diffusers components."""

    def __init__(self, comps: SDComponents, cfg: AugmentConfig, device="cpu"):
        self.comps, self.cfg, self.device = comps, cfg, device

    def drafts(self, templates, descriptions, seeds, size):
        out = []
        for template, seed in zip(templates, seeds):
            out.append(render_draft(self.comps, template, descriptions, GSAConfig(
                steps=self.cfg.draft_steps, sampler="ddim", guidance_scale=self.cfg.guidance_scale, seed=seed), size,
                self.device))
        return out

    def inpaint(self, image, mask, prompt, seed):
        out, info = masked_inpaint(self.comps, image, mask, prompt, GSAConfig(
            strength=1.0, steps=self.cfg.inpaint_steps, sampler="ddim", guidance_scale=self.cfg.guidance_scale, seed=seed), device=self.device)
        return out, info["unet_evaluations"]

    def gsa(self, image, prompt, seed, phrases=None):
        cfg = GSAConfig(**{**self.cfg.gsa.__dict__, "seed": seed})
        if phrases is None:
            return guided_sde_augment(self.comps, image, prompt, cfg, device=self.device)
        store = SamplingAttention()
        unet = self.comps.unet
        install_attention_capture(unet, store, capture_layers(unet, image.shape[0] // self.comps.vae_scale_factor, 16))
        try:
            out, info = guided_sde_augment(self.comps, image, prompt, cfg, device=self.device, attention=store)
        finally:
            remove_attention_capture(unet)
        info["attention"] = token_maps(store.mean(), token_positions(self.comps.tokenizer, prompt, phrases))
        return out, info


def augment(renderer: Renderer | SDComponents, reference: torch.Tensor, ref_masks: Sequence[torch.Tensor],
            class_nouns: Sequence[str], descriptions: Sequence[str], templates: Sequence[PromptTemplate],
            cfg: AugmentConfig | None = None, *, sam=None, detector=None, device="cpu",
            progress: Callable[[int, int, str, torch.Tensor | None], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_pair: Callable[[AugmentedPair], None] | None = None) -> AugmentReport:
    cfg = cfg or AugmentConfig()
    if isinstance(renderer, SDComponents):
        renderer = DiffusersRenderer(renderer, cfg, device)
    n = len(class_nouns)
    if len(ref_masks) != n or len(descriptions) != n:
        raise DynASynError(f"{len(ref_masks)} masks, {len(descriptions)} descriptions and {n} class nouns: "
                           "give one of each per subject.")
    if not templates:
        raise DynASynError("No prompts to augment with (K = 0).")
    if cfg.draft_batch < 1:
        raise DynASynError(f"draft_batch must be at least 1 (got {cfg.draft_batch}).")
    if cfg.pseudo_masks not in PSEUDO_MASKS:
        raise DynASynError(f"pseudo_masks must be one of {', '.join(PSEUDO_MASKS)} (got {cfg.pseudo_masks!r}).")
    started = time.time()
    report = AugmentReport([], [], [])
    size = (cfg.size, cfg.size)
    evaluations = 0
    for first in range(0, len(templates), cfg.draft_batch):
        if should_stop and should_stop():
            break
        chunk = list(templates[first:first + cfg.draft_batch])
        if progress:
            progress(first, len(templates), chunk[0].render(descriptions), report.pairs[-1].image if report.pairs else None)
        drafts = renderer.drafts(chunk, descriptions, [cfg.seed + first + i for i in range(len(chunk))], size)
        evaluations += cfg.draft_steps * len(chunk)
        for i, draft in enumerate(drafts):
            k, seed = first + i, cfg.seed + first + i
            if should_stop and should_stop():
                break
            if progress and i:
                progress(k, len(templates), draft.prompt, report.pairs[-1].image if report.pairs else None)
            report.drafts.append(draft.image)
            pair, evals = _compose_and_gsa(renderer, draft, n, sam, detector, reference, ref_masks, class_nouns, cfg, seed)
            evaluations += evals
            if isinstance(pair, str):
                report.skipped.append((k, pair))
            else:
                report.pairs.append(pair)
                if on_pair:
                    on_pair(pair)  # the caller can keep the pairs made so far if the run is cancelled
    report.unet_evaluations = evaluations
    report.seconds = time.time() - started
    return report


def _compose_and_gsa(renderer: Renderer, draft: Draft, n: int, sam, detector, reference, ref_masks, class_nouns,
                     cfg: AugmentConfig, seed: int) -> tuple[AugmentedPair | str, int]:
    """One draft to one pair (or the reason it was skipped), and the UNet evaluations it took."""
    pseudo = pseudo_masks(draft, n, sam, cfg.attention_threshold, detector)
    composed = paste_subjects(draft.image, pseudo, reference, ref_masks, dilation=cfg.inpaint_dilation,
                              min_pixels=cfg.min_mask_pixels)
    if composed.skipped:
        return "no pseudo-mask for " + ", ".join(class_nouns[i] for i in composed.skipped), 0
    image, evaluations = composed.image, 0
    inpainted = bool(composed.inpaint_mask.sum() > 0)
    if inpainted:
        image, evals = renderer.inpaint(image, composed.inpaint_mask, draft.prompt, seed)
        evaluations += evals
    # without SAM the GSA pass's own cross-attention re-segments its output
    image, info = renderer.gsa(image, draft.prompt, seed, **({} if sam is not None else {"phrases": draft.phrases}))
    evaluations += info["unet_evaluations"]
    order = draft.template.subjects
    pasted = composed.masks[order]
    pasted = torch.nn.functional.interpolate(pasted[:, None], size=image.shape[:2], mode="nearest")[:, 0]
    # GSA changes pose and outline: L_AUG's pseudo-masks come from its output, not from the pasted silhouettes
    resegmented, kept = resegment(image, pasted, sam, info.get("attention"), cfg.attention_threshold,
                                  min_pixels=cfg.min_mask_pixels)
    masks = resegmented if cfg.pseudo_masks == "resegmented" else pasted
    return AugmentedPair(image, draft.template.render(class_nouns), list(order), masks,
                         {"seed": seed, "template": draft.template.text, "prompt": draft.prompt,
                          "start_timestep": info["start_timestep"], "inpainted": inpainted,
                          "mask_source": cfg.pseudo_masks, "pasted_masks": pasted, "resegmented_masks": resegmented,
                          "resegment_kept_pasted": [order[k] for k in kept]}), evaluations
