"""SAM nodes: load SAM weights from models/sams, and one MASK per subject from box / point prompts."""

from __future__ import annotations

import json
import os

import segment_anything  # noqa: F401  (optional dependency: without it only these nodes are disabled)
import torch

import folder_paths

from ..dynasyn.errors import DynASynError
from .aux_models import SAM_INPUTS, sam_module, used_on_device
from .common import one_image, user_error

TINY = "tiny (random test-size SAM, for trying graphs)"


def register_sams_folder() -> None:
    """``models/sams`` (shared with Impact Pack), added once; extra_model_paths.yaml entries are kept."""
    if "sams" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("sams", os.path.join(folder_paths.models_dir, "sams"))
    paths, exts = folder_paths.folder_names_and_paths["sams"]
    folder_paths.folder_names_and_paths["sams"] = (paths, set(exts) | {".pth", ".pt"})


register_sams_folder()


class DynASynSAMLoader:
    DESCRIPTION = ("Loads Segment Anything from ComfyUI/models/sams: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
                   "sam_vit_h_4b8939.pth (the size is read from the name). The tiny entry builds a random test-size SAM. "
                   "It is loaded on the CPU; the nodes using it move it to the GPU only while they run.")
    CATEGORY = "DynASyn/masks"
    FUNCTION = "load"
    RETURN_TYPES = ("DYNASYN_SAM",)
    RETURN_NAMES = ("sam",)
    OUTPUT_TOOLTIPS = ("The SAM model, for DynASyn SAM Masks and DynASyn Augment.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list("sams")
        return {"required": {
            "sam_name": (names + [TINY], {"default": names[0] if names else TINY, "tooltip": "A file in models/sams."}),
        }}

    def load(self, sam_name):
        try:
            from ..dynasyn.sam import build_tiny_sam, load_sam

            if sam_name == TINY:
                return ({"model": build_tiny_sam(), "name": "tiny"},)
            path = folder_paths.get_full_path("sams", sam_name)
            if path is None:
                raise DynASynError(f"{sam_name} is not in models/sams; put the SAM weights there and refresh.")
            return ({"model": load_sam(path), "name": sam_name},)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


def parse_subject_prompts(text: str):
    """JSON list, one entry per subject: {"box": [x0, y0, x1, y1]} and/or {"points": [[x, y], ...], "labels": [1, ...]}."""
    from ..dynasyn.sam import SubjectPrompt

    try:
        items = json.loads(text or "[]")
    except ValueError as e:
        raise DynASynError(f"The SAM prompts are not valid JSON: {e}. Expected e.g. "
                           '[{"box": [10, 10, 200, 220]}, {"points": [[300, 260]]}].') from None
    if not isinstance(items, list) or not items:
        raise DynASynError('Give one SAM prompt per subject, e.g. [{"box": [10, 10, 200, 220]}, {"points": [[300, 260]]}].')
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise DynASynError(f"SAM prompt {i + 1} must be an object with 'box' and/or 'points'.")
        box = it.get("box")
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise DynASynError(f"SAM prompt {i + 1}: 'box' must be [x0, y0, x1, y1] in pixels.")
        points = [tuple(p) for p in it.get("points", [])]
        out.append(SubjectPrompt(box=tuple(box) if box else None, points=points, labels=list(it.get("labels", []))))
    return out


class DynASynSAMMasks:
    DESCRIPTION = ("One MASK per subject from SAM: each subject gets a box and/or points (pixels of the image). The output "
                   "is the MASK batch DynASyn Describe / Augment / Train expect, subject 1 first. SAM comes from DynASyn "
                   "SAM Loader ('sam') or Impact Pack's SAMLoader ('sam_model'); it is on the GPU only while this runs.")
    CATEGORY = "DynASyn/masks"
    FUNCTION = "segment"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("masks",)
    OUTPUT_TOOLTIPS = ("N masks, one per subject prompt.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The reference picture (one image)."}),
            "subject_prompts": ("STRING", {"multiline": True, "default": '[{"box": [8, 8, 240, 240]}, {"points": [[380, 380]]}]',
                                           "tooltip": ("One entry per subject, in subject order: {\"box\": [x0, y0, x1, y1]} "
                                                       "and/or {\"points\": [[x, y], ...], \"labels\": [1 = subject, 0 = not]}.")}),
            "clip_to_box": ("BOOLEAN", {"default": True, "tooltip": "Keep only the part of a mask inside its box."}),
        }, "optional": dict(SAM_INPUTS)}

    def segment(self, image, subject_prompts, clip_to_box, sam=None, sam_model=None):
        try:
            from ..dynasyn.sam import segment
            ref = one_image(image)
            prompts = parse_subject_prompts(subject_prompts)
            model = sam_module(sam, sam_model)
            if model is None:
                raise DynASynError("Connect a SAM: DynASyn SAM Loader to 'sam', or Impact Pack's SAMLoader to 'sam_model'.")
            with torch.inference_mode(False), used_on_device(model):
                masks = segment(model, ref, prompts, clip_to_box=clip_to_box)
            empty = [i + 1 for i, m in enumerate(masks) if m.sum() == 0]
            if empty:
                raise DynASynError(f"SAM found nothing for subject(s) {empty}: move the box or points onto the subject.")
            return (masks,)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
