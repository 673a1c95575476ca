"""DynASyn Save Checkpoint: MODEL + CLIP + VAE -> models/checkpoints/<name>.safetensors."""

from __future__ import annotations

import os

import folder_paths

from ..dynasyn.export import unique_name, validate_export_name
from . import bridge
from .common import user_error


class DynASynSaveCheckpoint:
    DESCRIPTION = ("Saves MODEL, CLIP and VAE as one .safetensors checkpoint in models/checkpoints (written with "
                   "ComfyUI's own save function), which CheckpointLoaderSimple loads. Trained weights that arrive as "
                   "patches are baked in; v-prediction is recorded. An existing file is never overwritten.")
    CATEGORY = "DynASyn/export"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("checkpoint_name",)
    OUTPUT_TOOLTIPS = ("The file name to pick in CheckpointLoaderSimple.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x / 2.x MODEL, e.g. the trained one from DynASyn Train."}),
            "clip": ("CLIP", {"tooltip": "The CLIP (text encoder) of the same model."}),
            "vae": ("VAE", {"tooltip": "The VAE of the same model."}),
            "name": ("STRING", {"default": "dynasyn", "tooltip": (
                "File name without extension: letters, digits, '_', '-', '.'; no spaces or folders.")}),
            "if_exists": (["new name", "error"], {"default": "new name", "tooltip": (
                "When models/checkpoints/<name>.safetensors exists: add a number (name_001...) or stop with an error. "
                "Existing files are never overwritten.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, model, clip, vae, name, if_exists="new name"):
        # Re-run (instead of answering from ComfyUI's cache) when the target file appears or vanishes,
        # so a queued re-save reports "already exists" or writes a numbered copy.
        try:
            validate_export_name(name, "checkpoint")  # before any filesystem call: no existence probe of other paths
        except Exception:  # noqa: BLE001 - save() reports the bad name
            return float("nan")
        folder = folder_paths.get_folder_paths("checkpoints")[0]
        return os.path.exists(os.path.join(folder, f"{name}.safetensors"))

    def save(self, model, clip, vae, name, if_exists="new name"):
        try:
            folder = folder_paths.get_folder_paths("checkpoints")[0]
            validate_export_name(name, "checkpoint")
            if if_exists == "new name":
                name = unique_name(folder, name)
            path = bridge.save_checkpoint(folder, name, model, clip, vae, metadata={"source": "DynASyn Save Checkpoint"})
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return {"ui": {"text": [str(path)]}, "result": (path.name,)}
