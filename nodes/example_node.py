"""DynASyn Example Scene: the bundled two-subject picture, its masks and class nouns, drawn in code (no file to load)."""

from __future__ import annotations

import os
import re

import numpy as np
import torch
import folder_paths

from ..dynasyn.example_scene import RENAMED, SCENES, example_scene
from .common import user_error


class DynASynExampleScene:
    DESCRIPTION = ("The bundled example: ONE picture holding two subjects, one mask per subject and their class nouns, "
                   "drawn in code (nothing to download or upload), so the shipped workflows run as they are. Replace it "
                   "with LoadImage + your masks (DynASyn Subject Masks, or DynASyn SAM Masks) and your class nouns.")
    CATEGORY = "DynASyn/inputs"
    FUNCTION = "scene"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("image", "masks", "class_nouns")
    OUTPUT_TOOLTIPS = ("The picture (one IMAGE).",
                       "One mask per subject, as a MASK batch in class-noun order (for DynASyn Train / Augment).",
                       "The subjects' class nouns, comma-separated ('ball, box').")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"scene": (list(SCENES), {"tooltip": (
            "Which picture. 512 px ball and box: for SD 1.5 / 2.1 checkpoints. 64 px dotted ball and striped box: for "
            "the DynASyn Shapes World Model, two subjects it never saw (no object it was trained on wore their colour pairs).")})}}

    @classmethod
    def VALIDATE_INPUTS(cls, scene):
        """Instead of ComfyUI's list check: a workflow saved with an earlier label of a scene still runs."""
        if scene is None:  # linked: checked when it runs
            return True
        if isinstance(scene, str) and (scene in SCENES or scene in RENAMED):
            return True
        return f"Unknown example scene {str(scene)[:80]!r}; choose one of: {'; '.join(SCENES)}."

    def scene(self, scene):
        try:
            ex = example_scene(scene)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
        image = torch.from_numpy(ex.image).float().div(255)[None]
        masks = torch.from_numpy(ex.masks).float()
        return {"ui": {"images": _preview(scene, ex)}, "result": (image, masks, ex.class_nouns)}


def _preview(name: str, ex) -> list[dict]:
    """The picture, then the picture with its masks tinted, as temp PNGs for the node's preview (and the SAM picker)."""
    from PIL import Image

    folder = os.path.join(folder_paths.get_temp_directory(), "dynasyn")
    os.makedirs(folder, exist_ok=True)
    stem = "example_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    rgb = ex.image.astype(np.float32)
    tinted = rgb * 0.35
    for m, color in zip(ex.masks, ((79, 195, 247), (255, 183, 77), (129, 199, 132), (229, 115, 115))):
        tinted = np.where(m[..., None], 0.45 * rgb + 0.55 * np.array(color, np.float32), tinted)
    out = []
    for suffix, arr in (("", rgb), ("_masks", tinted)):
        filename = f"{stem}{suffix}.png"
        Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).save(os.path.join(folder, filename), compress_level=1)
        out.append({"filename": filename, "subfolder": "dynasyn", "type": "temp"})
    return out
