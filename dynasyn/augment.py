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
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from .compose import Composed, paste_subjects
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

    def __post_init__(self):
        if self.draft_batch < 1:
            raise DynASynError(f"draft_batch must be at least 1 (got {self.draft_batch}).")
        if self.pseudo_masks not in PSEUDO_MASKS:
            raise DynASynError(f"pseudo_masks must be one of {', '.join(PSEUDO_MASKS)} (got {self.pseudo_masks!r}).")


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

    def gsa(self, image: torch.Tensor, prompt: str, seed: int, phrases: Sequence[str] | None = None,
            before: Sequence[str] | None = None) -> tuple[torch.Tensor, dict]:
        """With ``phrases``, info["attention"] is each phrase's cross-attention [S, r, r] averaged over the pass;
        ``before``: the prompt's text before each phrase (``Draft.before``), where its search starts."""


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

    def gsa(self, image, prompt, seed, phrases=None, before=None):
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
        info["attention"] = token_maps(store.mean(), token_positions(self.comps.tokenizer, prompt, phrases, before))
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
    started = time.time()
    report = AugmentReport([], [], [])
    evaluations = 0

    def before(k, prompt):
        if progress:
            progress(k, len(templates), prompt, report.pairs[-1].image if report.pairs else None)

    for k, draft, pseudo in drafts_with_masks(renderer, templates, descriptions, n, cfg, sam=sam, detector=detector,
                                              should_stop=should_stop, before=before):
        evaluations += cfg.draft_steps
        report.drafts.append(draft.image)
        pair, evals = _compose_and_gsa(renderer, draft, pseudo, reference, ref_masks, class_nouns, cfg, cfg.seed + k, sam)
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


def drafts_with_masks(renderer: Renderer, templates: Sequence[PromptTemplate], descriptions: Sequence[str], n: int,
                      cfg: AugmentConfig, *, sam=None, detector=None, first: int = 0,
                      should_stop: Callable[[], bool] | None = None,
                      before: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, Draft, torch.Tensor]]:
    """Step 4: ``(k, draft, pseudo-masks [n, H, W] by subject index)`` for each template, rendered ``draft_batch``
    at a time. ``templates[k]`` is prompt ``first + k`` of the whole list: it always uses seed ``cfg.seed + first + k``,
    whatever the batch or the slice. ``before(k, prompt)`` is called before each draft's work."""
    for start in range(0, len(templates), cfg.draft_batch):
        if should_stop and should_stop():
            return
        chunk = list(templates[start:start + cfg.draft_batch])
        if before:
            before(start, chunk[0].render(descriptions))
        seeds = [cfg.seed + first + start + i for i in range(len(chunk))]
        for i, draft in enumerate(renderer.drafts(chunk, descriptions, seeds, (cfg.size, cfg.size))):
            if should_stop and should_stop():
                return
            if before and i:
                before(start + i, draft.prompt)
            yield start + i, draft, pseudo_masks(draft, n, sam, cfg.attention_threshold, detector)


def compose(draft_image: torch.Tensor, pseudo: torch.Tensor, reference: torch.Tensor, ref_masks: Sequence[torch.Tensor],
            cfg: AugmentConfig) -> Composed:
    """Step 5: the real subjects pasted where the draft's pseudo-masks put them, and the gaps to inpaint."""
    return paste_subjects(draft_image, pseudo, reference, ref_masks, dilation=cfg.inpaint_dilation,
                          min_pixels=cfg.min_mask_pixels)


def make_pair(image: torch.Tensor, template: PromptTemplate, class_nouns: Sequence[str], pasted: torch.Tensor,
              cfg: AugmentConfig, *, sam=None, attention: torch.Tensor | None = None, meta: dict | None = None
              ) -> AugmentedPair:
    """Step 7: the training pair of an augmented ``image``: ĉ_a (``template`` with the class nouns) and the
    pseudo-masks of the subjects it names, in its order. ``pasted`` [N, h, w] (by subject index) are where the
    subjects were put; GSA changes pose and outline, so with ``cfg.pseudo_masks`` "resegmented" they are found
    again on ``image`` (SAM prompted by each pasted mask, or ``attention`` [S, r, r] in template order)."""
    order = template.subjects
    pasted = F.interpolate(pasted[order][:, None].float(), size=image.shape[:2], mode="nearest")[:, 0]
    resegmented, kept = resegment(image, pasted, sam, attention, cfg.attention_threshold, min_pixels=cfg.min_mask_pixels)
    masks = resegmented if cfg.pseudo_masks == "resegmented" else pasted
    return AugmentedPair(image, template.render(class_nouns), list(order), masks,
                         {**(meta or {}), "template": template.text, "mask_source": cfg.pseudo_masks,
                          "pasted_masks": pasted, "resegmented_masks": resegmented,
                          "resegment_kept_pasted": [order[k] for k in kept]})


def _compose_and_gsa(renderer: Renderer, draft: Draft, pseudo: torch.Tensor, reference, ref_masks, class_nouns,
                     cfg: AugmentConfig, seed: int, sam) -> tuple[AugmentedPair | str, int]:
    """One draft to one pair (or the reason it was skipped), and the UNet evaluations it took."""
    composed = compose(draft.image, pseudo, reference, ref_masks, cfg)
    if composed.skipped:
        return "no pseudo-mask for " + ", ".join(class_nouns[i] for i in composed.skipped), 0
    image, evaluations = composed.image, 0
    inpainted = bool(composed.inpaint_mask.sum() > 0)
    if inpainted:
        image, evals = renderer.inpaint(image, composed.inpaint_mask, draft.prompt, seed)
        evaluations += evals
    # without SAM the GSA pass's own cross-attention re-segments its output
    image, info = renderer.gsa(image, draft.prompt, seed,
                               **({} if sam is not None else {"phrases": draft.phrases, "before": draft.before or None}))
    evaluations += info["unet_evaluations"]
    return make_pair(image, draft.template, class_nouns, composed.masks, cfg, sam=sam, attention=info.get("attention"),
                     meta={"seed": seed, "prompt": draft.prompt, "start_timestep": info["start_timestep"],
                           "inpainted": inpainted}), evaluations
