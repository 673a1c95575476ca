"""DynASyn Shapes World Model: the small pretrained SD-shaped model shipped with the pack, as native MODEL/CLIP/VAE."""

from __future__ import annotations

import diffusers  # noqa: F401  (optional dependency)
import torch
import folder_paths

from . import bridge
from .common import user_error


class DynASynShapesWorldModel:
    DESCRIPTION = ("Loads the Shapes World model shipped with the pack: a small Stable-Diffusion-shaped model (cross-attention "
                   "UNet, CLIP text encoder over CLIP's vocabulary, KL VAE with 4x downscale) pretrained on the Shapes World, "
                   "pictures of balls, boxes, cones, stars and rings in six colours on room/beach/snow/grass backgrounds. "
                   "Prompts like 'a red ball left of a blue box on the grass' or 'a green cone jumping' work with stock "
                   "CLIPTextEncode/KSampler/VAEDecode. Pictures are 64 px: a 128x128 EmptyLatentImage gives its 16x16 latents.")
    CATEGORY = "DynASyn/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("Shapes World diffusion model (16x16 latents = 64 px pictures).",
                       "Shapes World CLIP text encoder (CLIP's real vocabulary, width 64).",
                       "Shapes World VAE (4x: 64 px pictures <-> 16x16 latents).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        try:
            from transformers import CLIPTokenizer

            from ..dynasyn.shapes.model import load_shapes_components

            tok = CLIPTokenizer.from_pretrained(str(bridge.TOKENIZER_DIR), model_max_length=77, local_files_only=True)
            with torch.inference_mode(False):
                comps = load_shapes_components(tokenizer=tok)
                return bridge.tiny_native(comps, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
