"""DynASyn GSA: Guided SDE Augmentation with ComfyUI's own sampler on the native MODEL.

The start timestep comes from the library's ``start_timesteps`` (the same strength <-> t rule as
the standalone path): the node samples over the sigmas of exactly those timesteps, so with
strength 0.7 and steps a multiple of 10 it starts at t = 699 (the paper's 700 of 1000) whatever
the sampler.
"""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..dynasyn.gsa import PAPER_START_T, GSAConfig, make_scheduler, start_timesteps
from .common import user_error


def gsa_sigmas(model, strength: float, steps: int, paper_exact: bool = False) -> tuple[torch.Tensor, int]:
    """Sigmas of the GSA timesteps for this model (then 0), and the start timestep as the model reads its first sigma."""
    cfg = GSAConfig(strength=strength, steps=steps, paper_exact=paper_exact)
    steps, strength = (1000, PAPER_START_T / 1000) if paper_exact else (steps, strength)
    timesteps = start_timesteps(make_scheduler(cfg, "epsilon"), steps, strength)
    ms = model.get_model_object("model_sampling")
    sigmas = torch.cat([ms.sigma(timesteps.float()).float().cpu(), torch.zeros(1)])
    return sigmas, int(round(float(ms.timestep(sigmas[:1]))))


class DynASynGSA:
    DESCRIPTION = ("Guided SDE Augmentation (paper): diffuses an IMAGE to t = strength x 1000 (0.7 -> t = 700) and denoises "
                   "it under the prompt with ComfyUI's sampler, so pasted subjects blend into the scene and keep their "
                   "identity. paper_exact runs 700 DDPM steps; the default runs int(steps x strength) steps of the chosen "
                   "sampler over the same start.")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "gsa"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "info")
    OUTPUT_TOOLTIPS = ("The augmented image.", "Start timestep and number of steps.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model."}),
            "positive": ("CONDITIONING", {"tooltip": "The augmented prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt."}),
            "vae": ("VAE", {"tooltip": "The model's VAE."}),
            "image": ("IMAGE", {"tooltip": "Composed image(s)."}),
            "strength": ("FLOAT", {"default": 0.7, "min": 0.05, "max": 1.0, "step": 0.05, "tooltip": "Start at t = strength x 1000 (paper: 0.7)."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Schedule length; int(steps x strength) steps run (a multiple of 10 starts exactly at t = 700)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "ddim", "tooltip": "ComfyUI sampler."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": "Classifier-free guidance."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "tooltip": "Noise seed."}),
            "paper_exact": ("BOOLEAN", {"default": False, "tooltip": "700 DDPM steps from t = 700, as in the paper (slow)."}),
        }}

    def gsa(self, model, positive, negative, vae, image, strength, steps, sampler_name, cfg, seed, paper_exact):
        try:
            sigmas, start_t = gsa_sigmas(model, strength, steps, paper_exact)
            sampler = comfy.samplers.sampler_object("ddpm" if paper_exact else sampler_name)
            latent = vae.encode(image[..., :3])
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = comfy.sample.prepare_noise(latent, seed)
            callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
            samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                                 callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                                 seed=seed)
            out = vae.decode(samples)
            if out.ndim == 5:
                out = out.reshape(-1, *out.shape[-3:])
            info = f"start t = {start_t} of 1000, {len(sigmas) - 1} {'ddpm' if paper_exact else sampler_name} steps"
            return {"ui": {"text": [info]}, "result": (out, info)}
        except mm.InterruptProcessingException:
            raise
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
