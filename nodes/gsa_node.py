"""DynASyn GSA: Guided SDE Augmentation with ComfyUI's own sampler on the native MODEL.

The start timestep comes from the library's ``start_timesteps`` (the same strength <-> t rule as
the standalone path): the node samples over the sigmas of exactly those timesteps, so with
strength 0.7 and steps a multiple of 10 it starts at t = 699 (the paper's 700 of 1000) whatever
the sampler.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.samplers

from .bridge import model_family
from .comfy_render import comfy_gsa
from .common import user_error


class DynASynGSA:
    DESCRIPTION = ("Guided SDE Augmentation (paper): diffuses an IMAGE to t = strength x 1000 (0.7 -> t = 700) and denoises "
                   "it under the prompt with ComfyUI's sampler, so pasted subjects blend into the scene and keep their "
                   "identity. paper_exact runs 700 DDPM steps; the default runs int(steps x strength) steps of the chosen "
                   "sampler over the same start (default ddpm: stochastic, as the paper's SDE).")
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
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "ddpm", "tooltip": (
                "ComfyUI sampler over the GSA sigmas. ddpm (default) is the paper's stochastic reverse SDE (fresh noise "
                "every step, seeded by 'seed'); euler_ancestral is another stochastic one; ddim / euler are deterministic.")}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": "Classifier-free guidance."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": False, "tooltip": "Noise seed."}),
            "paper_exact": ("BOOLEAN", {"default": False, "tooltip": "700 DDPM steps from t = 700, as in the paper (slow)."}),
        }}

    def gsa(self, model, positive, negative, vae, image, strength, steps, sampler_name, cfg, seed, paper_exact):
        try:
            model_family(model)  # the same check as Train: SD 1.x / 2.x only, before any sampling
            out, start_t, n = comfy_gsa(model, positive, negative, vae, image, strength, steps, sampler_name, cfg, seed,
                                        paper_exact)
            info = f"start t = {start_t} of 1000, {n} {'ddpm' if paper_exact else sampler_name} steps"
            return {"ui": {"text": [info]}, "result": (out, info)}
        except mm.InterruptProcessingException:
            raise
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
