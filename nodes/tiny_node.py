"""DynASyn Tiny Model: a random-weight SD-shaped MODEL/CLIP/VAE built locally (no download)."""

from __future__ import annotations

import diffusers  # noqa: F401  (optional dependency)
import torch
import folder_paths

from . import bridge
from .common import user_error


class DynASynTinyModel:
    DESCRIPTION = ("Builds a tiny random-weight Stable Diffusion (SD 1.x-shaped UNet with 16x16 cross-attention, CLIP "
                   "text encoder, KL VAE with 2x downscale) for trying graphs and for tests. It runs every node of the pack "
                   "in seconds on a CPU; its pictures are noise. Use 64 px images (256 px empty latents give 32x32 latents).")
    CATEGORY = "DynASyn/dev"
    FUNCTION = "build"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("Tiny diffusion model.", "Tiny CLIP text encoder (CLIP's real vocabulary).", "Tiny VAE (2x).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False, "tooltip": "Seed of the random weights."}),
            "prediction": (["epsilon", "v_prediction"], {"default": "epsilon", "tooltip": "Prediction type of the model."}),
        }}

    def build(self, seed, prediction):
        try:
            from transformers import CLIPTokenizer

            from ..dynasyn.tiny import tiny_components

            tok = CLIPTokenizer.from_pretrained(str(bridge.TOKENIZER_DIR), model_max_length=77, local_files_only=True)
            with torch.inference_mode(False):
                comps = tiny_components(seed=seed, prediction_type=prediction, tokenizer=tok)
                return bridge.tiny_native(comps, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
