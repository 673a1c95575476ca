"""Steps 5-6 of augmentation: masked denoising (inpaint) and Guided SDE Augmentation (GSA).

GSA diffuses the composed image to t = 700 of 1000 and denoises it under the augmented prompt
(paper: "Guided SDE Augmentation"), so the pasted subjects blend into the draft's pose and
light while keeping their identity. The paper's reverse pass is an SDE (700 ancestral DDPM
steps); the default here is the same ancestral DDPM sampler (fresh noise at every step) with
"trailing" spacing over a 30-step schedule, whose 21 denoising steps start exactly at the same
t = 699 (0-based), i.e. 33x fewer UNet evaluations. ``sampler="ddim"`` (eta 0) or ``"euler"``
is the deterministic option (an ODE: the output is a function of the start noise alone). ``strength`` <-> start timestep
follows diffusers' img2img (written once in ``start_timesteps``), so the library matches
``StableDiffusionImg2ImgPipeline`` step for step.

Inpainting uses the same base model by masked denoising: outside the mask the latents are
replaced, after every step, by the known image noised to the current level, and the known
pixels are put back after decoding (no inpainting UNet or LaMa weights are needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import DynASynError
from .models import SD_SCHEDULE, SDComponents

SAMPLERS = ("ddim", "ddpm", "euler")
PAPER_START_T = 700


@dataclass
class GSAConfig:
    strength: float = 0.7          # start at t = strength * 1000 (paper: 700)
    steps: int = 30                # schedule length; int(steps * strength) denoising steps run (a multiple of 10
                                   # starts exactly at t = 699 with strength 0.7; others at the schedule point below)
    sampler: str = "ddpm"          # ddpm: stochastic reverse SDE (paper); ddim (eta 0) | euler: deterministic
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    paper_exact: bool = False      # 1000-step DDPM schedule: 700 ancestral steps from t = 700

    def __post_init__(self):
        if not 0.0 < self.strength <= 1.0:
            raise DynASynError(f"GSA strength must be in (0, 1]; got {self.strength} (the paper uses 0.7).")
        if self.sampler not in SAMPLERS:
            raise DynASynError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.steps < 1:
            raise DynASynError(f"steps must be at least 1 (got {self.steps}).")


def make_scheduler(cfg: GSAConfig, prediction_type: str):
    """The sampling scheduler; ``paper_exact`` overrides sampler and steps with 1000-step DDPM."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    common = dict(SD_SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing")
    if cfg.paper_exact or cfg.sampler == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if cfg.sampler == "euler":
        return EulerDiscreteScheduler(**common)
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def start_timesteps(scheduler, steps: int, strength: float, device="cpu") -> torch.Tensor:
    """diffusers img2img's ``get_timesteps``: the last ``int(steps * strength)`` timesteps of a ``steps`` schedule."""
    scheduler.set_timesteps(steps, device=device)
    init = min(int(steps * strength), steps)
    t_start = max(steps - init, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


@torch.no_grad()
def encode_prompts(comps: SDComponents, prompt: str, negative: str, device) -> torch.Tensor:
    """[uncond, cond] embeddings, as diffusers' pipelines build them for classifier-free guidance."""
    tok = comps.tokenizer

    def enc(text):
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return comps.text_encoder(ids)[0]

    return torch.cat([enc(negative), enc(prompt)])


@torch.no_grad()
def denoise(comps: SDComponents, image: torch.Tensor | None, prompt: str, cfg: GSAConfig, *,
            inpaint_mask: torch.Tensor | None = None, size: tuple[int, int] = (512, 512), device="cpu",
            attention=None, callback: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Diffuse ``image`` ([H, W, 3] in [0, 1]) to the start timestep and denoise it under ``prompt``.

    ``image`` None: text-to-image from pure noise at ``size`` (H, W) over the whole schedule (drafts).
    With ``inpaint_mask`` ([H, W], 1 = repaint) only the masked region is generated; the rest is
    the known image at every step. ``attention`` (an ``AttentionStore`` whose processors are on the
    UNet) records the conditional half's cross-attention at every step.
    Returns the image and {"start_timestep", "unet_evaluations"}.
    """
    f = comps.vae_scale_factor
    if image is not None and (image.ndim != 3 or image.shape[-1] != 3):
        raise DynASynError(f"GSA needs one RGB image [H, W, 3]; got {tuple(image.shape)}.")
    H, W = image.shape[:2] if image is not None else size
    h, w = H // f * f, W // f * f
    if h == 0 or w == 0:
        raise DynASynError(f"The image ({W}x{H}) is smaller than the VAE's factor {f}.")
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    unet, vae = comps.unet.to(device), comps.vae.to(device)
    comps.text_encoder.to(device)
    sched = make_scheduler(cfg, comps.prediction_type)
    steps = 1000 if cfg.paper_exact else cfg.steps
    strength = 1.0 if image is None else PAPER_START_T / 1000 if cfg.paper_exact else cfg.strength
    timesteps = start_timesteps(sched, steps, strength, device)
    embeds = encode_prompts(comps, prompt, cfg.negative_prompt, device).to(unet.dtype)

    if image is None:
        known = None
        latents = torch.randn((1, unet.config.in_channels, h // f, w // f), generator=gen).to(device, unet.dtype)
        latents = latents * sched.init_noise_sigma
    else:
        pixels = image.permute(2, 0, 1)[None].float().to(device)
        if (h, w) != (H, W):
            pixels = F.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False)
        pixels = (pixels * 2 - 1).to(vae.dtype)
        # the same generator draws as StableDiffusionImg2ImgPipeline: VAE sample, then the start noise
        known = vae.encode(pixels).latent_dist.sample(gen) * comps.scaling_factor
        noise = torch.randn(known.shape, generator=gen).to(device, known.dtype)
        latents = sched.add_noise(known, noise, timesteps[:1])
    if inpaint_mask is not None:
        keep = 1 - F.interpolate(inpaint_mask[None, None].float().to(device), size=known.shape[-2:], mode="nearest")
    step_kwargs = {"generator": gen} if "generator" in sched.step.__code__.co_varnames else {}
    if "eta" in sched.step.__code__.co_varnames:
        step_kwargs["eta"] = 0.0
    for i, t in enumerate(timesteps):
        model_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        if attention is not None:
            attention.enabled = True
        uncond, cond = unet(model_in, t, encoder_hidden_states=embeds).sample.chunk(2)
        if attention is not None:
            attention.enabled = False
            attention.accumulate()
        pred = uncond + cfg.guidance_scale * (cond - uncond)
        latents = sched.step(pred, t, latents, **step_kwargs).prev_sample
        if inpaint_mask is not None:
            nxt = timesteps[i + 1: i + 2]
            known_t = sched.add_noise(known, noise, nxt) if len(nxt) else known
            latents = keep * known_t + (1 - keep) * latents
        if callback:
            callback(i + 1, len(timesteps))
    out = vae.decode(latents / comps.scaling_factor).sample
    out = (out / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu()
    if inpaint_mask is not None:  # the VAE decoder mixes globally: put the known pixels back exactly
        m = F.interpolate(inpaint_mask[None, None].float(), size=(h, w), mode="nearest")[0, 0, :, :, None] > 0.5
        out = torch.where(m, out, (pixels[0].permute(1, 2, 0).float().cpu() + 1) / 2)
    return out, {"start_timestep": int(timesteps[0]), "unet_evaluations": len(timesteps)}


def guided_sde_augment(comps: SDComponents, composed: torch.Tensor, prompt: str, cfg: GSAConfig | None = None,
                       **kw) -> tuple[torch.Tensor, dict]:
    """GSA (paper): the composed image noised to t = 700 and denoised under the augmented prompt."""
    return denoise(comps, composed, prompt, cfg or GSAConfig(), **kw)


def masked_inpaint(comps: SDComponents, image: torch.Tensor, mask: torch.Tensor, prompt: str, cfg: GSAConfig | None = None,
                   **kw) -> tuple[torch.Tensor, dict]:
    """Fill ``mask`` (1 = fill) from pure noise with the base model; the rest stays the image."""
    cfg = cfg or GSAConfig(strength=1.0)
    return denoise(comps, image, prompt, cfg, inpaint_mask=mask, **kw)
