"""Exports stock loaders read: DynASyn Save Checkpoint (models/checkpoints) and DynASyn Save LoRA (models/loras)."""

from __future__ import annotations

import os

import folder_paths

from ..dynasyn import lora
from ..dynasyn.export import unique_name, validate_export_name
from . import bridge
from .common import user_error


_WHAT = {"checkpoints": "checkpoint", "loras": "LoRA"}  # the word error messages use for each models/ folder


def _target_exists(kind: str, name: str):
    """IS_CHANGED for a save node: re-run when ``models/<kind>/<name>.safetensors`` appears or vanishes, so a queued
    re-save reports "already exists" or writes a numbered copy instead of answering from ComfyUI's cache."""
    try:
        validate_export_name(name, _WHAT[kind])  # before any filesystem call: no existence probe of other paths
    except Exception:  # noqa: BLE001 - the save reports the bad name
        return float("nan")
    folder = folder_paths.get_folder_paths(kind)[0]
    return os.path.exists(os.path.join(folder, f"{name}.safetensors"))


def _target_name(kind: str, name: str, if_exists: str) -> tuple[str, str]:
    """(folder, name) for a save into ``models/<kind>``: the name checked, numbered when asked, never overwriting."""
    validate_export_name(name, _WHAT[kind])
    folder = folder_paths.get_folder_paths(kind)[0]
    if if_exists == "new name":
        name = unique_name(folder, name)
    return folder, name


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
        return _target_exists("checkpoints", name)

    def save(self, model, clip, vae, name, if_exists="new name"):
        try:
            folder, name = _target_name("checkpoints", name, if_exists)
            path = bridge.save_checkpoint(folder, name, model, clip, vae, metadata={"source": "DynASyn Save Checkpoint"})
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        return {"ui": {"text": [str(path)]}, "result": (path.name,)}


class DynASynSaveLoRA:
    DESCRIPTION = ("Saves what training changed as a small LoRA in models/loras, which a stock LoraLoader (and A1111/Forge) "
                   "loads on top of the base model: the trained-minus-base difference of every layer, cut to the given "
                   "rank by SVD (as core's Extract and Save Lora / kohya's extract). The UI shows the share of the change "
                   "the rank drops. An existing file is never overwritten.")
    CATEGORY = "DynASyn/export"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The file name to pick in LoraLoader.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_model": ("MODEL", {"tooltip": "The SD 1.x / 2.x MODEL training started from (the checkpoint loader's MODEL)."}),
            "trained_model": ("MODEL", {"tooltip": "The trained MODEL, e.g. from DynASyn Train."}),
            "rank": ("INT", {"default": 64, "min": 1, "max": lora.MAX_RANK, "tooltip": (
                "LoRA rank: higher keeps more of the trained change and makes a bigger file; a rank at least the widest "
                "layer (1280 for SD 1.5 / 2.x) keeps all of it, reproducing the trained model up to fp16 precision.")}),
            "name": ("STRING", {"default": "dynasyn_lora", "tooltip": (
                "File name without extension: letters, digits, '_', '-', '.'; no spaces or folders.")}),
            "if_exists": (["new name", "error"], {"default": "new name", "tooltip": (
                "When models/loras/<name>.safetensors exists: add a number (name_001...) or stop with an error. "
                "Existing files are never overwritten.")}),
            "biases_and_norms": ("BOOLEAN", {"default": True, "tooltip": (
                "Also store the changes of biases and norm layers whole (small; ComfyUI/LyCORIS '.diff' keys), so a full "
                "rank is exact. Off: only the low-rank layer pairs kohya tools write.")}),
        }, "optional": {
            "base_clip": ("CLIP", {"tooltip": "The base CLIP; with trained_clip, the text encoder's change is saved too."}),
            "trained_clip": ("CLIP", {"tooltip": "The trained CLIP, e.g. from DynASyn Train."}),
        }}

    @classmethod
    def IS_CHANGED(cls, base_model, trained_model, rank, name, if_exists="new name", **_):
        return _target_exists("loras", name)

    def save(self, base_model, trained_model, rank, name, if_exists="new name", biases_and_norms=True,
             base_clip=None, trained_clip=None):
        try:
            folder, name = _target_name("loras", name, if_exists)
            path, summary = bridge.save_lora(folder, name, base_model, trained_model, base_clip, trained_clip, rank,
                                             metadata={"source": "DynASyn Save LoRA"}, biases_and_norms=biases_and_norms)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        text = (f"{path.name}: rank {rank}, {summary['layers']} layers, {100 * summary['rel_error']:.2f}% of the change "
                f"dropped (worst layer {100 * summary['worst_rel_error']:.1f}%)")
        return {"ui": {"text": [text]}, "result": (path.name,)}
