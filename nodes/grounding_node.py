"""DynASyn Detector Loader: an optional zero-shot detector (OWL-ViT / OWLv2 / Grounding DINO) from models/grounding."""

from __future__ import annotations

import os

import folder_paths

from ..dynasyn.errors import DynASynError
from .common import user_error

FOLDER = "grounding"


def register_grounding_folder() -> None:
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def detector_folders() -> dict[str, str]:
    """{name: path} of the transformers folders (with config.json) under every models/grounding path."""
    out = {}
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, name, "config.json")):
                    out.setdefault(name, os.path.join(root, name))
    return out


register_grounding_folder()


class DynASynDetectorLoader:
    DESCRIPTION = ("Optional, for DynASyn Augment: a zero-shot detector that finds each subject in the drafts by its "
                   "description (Grounded-SAM style) instead of by its cross-attention. Put a transformers folder "
                   "(google/owlv2-base-patch16-ensemble, google/owlvit-base-patch32 or IDEA-Research/grounding-dino-tiny) "
                   "under ComfyUI/models/grounding. Subjects it does not find keep the attention box. It is loaded on the "
                   "CPU and is on the GPU only while a node uses it.")
    CATEGORY = "DynASyn/masks"
    FUNCTION = "load"
    RETURN_TYPES = ("DYNASYN_DETECTOR",)
    RETURN_NAMES = ("detector",)
    OUTPUT_TOOLTIPS = ("The detector, for DynASyn Augment's 'detector' input.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = list(detector_folders()) or ["(none: add a folder to models/grounding)"]
        return {"required": {
            "detector_name": (names, {"tooltip": "A detector folder in models/grounding."}),
            "threshold": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Boxes scoring below this count as 'not found' (OWLv2 ~0.1-0.2, Grounding DINO ~0.3)."}),
        }}

    def load(self, detector_name, threshold):
        try:
            from ..dynasyn.grounding import load_detector

            path = detector_folders().get(detector_name)
            if path is None:
                raise DynASynError(f"{detector_name!r} is not a folder in models/grounding; put a transformers detector "
                                   "folder there (config.json + weights + processor files) and refresh.")
            # on the CPU: the nodes using it move it to the GPU only while they run (nodes/aux_models.py)
            return (load_detector(path, threshold, device="cpu"),)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
