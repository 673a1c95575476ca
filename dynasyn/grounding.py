"""Optional open-vocabulary detector for the drafts' pseudo-masks (Grounded-SAM style).

The default needs no weights beyond SAM: each subject's cross-attention points SAM at it. When a
zero-shot detector is present (a transformers folder: OWL-ViT, OWLv2 or Grounding DINO, e.g.
google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny), the best box for each
subject's description replaces the attention box; subjects it does not find keep the attention box.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DynASynError

KINDS = {"owlvit": "owl", "owlv2": "owl", "grounding-dino": "grounding-dino"}


@dataclass
class Detector:
    model: torch.nn.Module
    processor: object
    model_type: str         # owlvit | owlv2 | grounding-dino
    threshold: float = 0.1  # boxes scoring below it count as "not found"


def load_detector(folder: str | Path, threshold: float = 0.1, device="cpu") -> Detector:
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DynASynError(f"No detector at {folder}: put a transformers detector folder (config.json + weights + processor "
                           "files, e.g. owlv2-base-patch16-ensemble or grounding-dino-tiny) under models/grounding.")
    model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    if model_type not in KINDS:
        raise DynASynError(f"{folder.name} is a {model_type!r} model; supported detectors: OWL-ViT, OWLv2, Grounding DINO.")
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise DynASynError(f"Cannot load the detector in {folder}: {e}") from None
    return Detector(model, processor, model_type, threshold)


def _call(fn, **kwargs):
    """Call ``fn`` with the keyword arguments it takes (thresholds were renamed across transformers releases)."""
    params = inspect.signature(fn).parameters
    if "threshold" not in params and "box_threshold" in params:
        kwargs["box_threshold"] = kwargs.pop("threshold")
    return fn(**{k: v for k, v in kwargs.items() if k in params})


@torch.no_grad()
def detect(detector: Detector, image: torch.Tensor, phrases: Sequence[str]) -> list[tuple[int, int, int, int] | None]:
    """The best-scoring box (x0, y0, x1, y1 in pixels) for each phrase in ``image`` [H, W, 3], or None."""
    from PIL import Image

    H, W = image.shape[:2]
    pil = Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    device = next(detector.model.parameters()).device
    phrases = [p.lower().strip() for p in phrases]
    if KINDS[detector.model_type] == "owl":
        inputs = detector.processor(text=[phrases], images=pil, return_tensors="pt").to(device)
        side = max(H, W) if detector.model_type == "owlv2" else None  # OWLv2 pads to a square
        target = [(side, side)] if side else [(H, W)]
        out = detector.model(**inputs)
        res = _call(detector.processor.post_process_grounded_object_detection, outputs=out, threshold=0.0,
                    target_sizes=target, text_labels=[phrases])[0]
        label_of = [int(i) for i in res["labels"]]
    else:  # Grounding DINO: one text, each phrase ending with a dot
        inputs = detector.processor(images=pil, text=". ".join(phrases) + ".", return_tensors="pt").to(device)
        out = detector.model(**inputs)
        res = _call(detector.processor.post_process_grounded_object_detection, outputs=out, input_ids=inputs["input_ids"],
                    threshold=0.0, text_threshold=0.0, target_sizes=[(H, W)])[0]
        names = res.get("text_labels", res["labels"])
        label_of = [next((i for i, p in enumerate(phrases) if p and (p in str(n) or str(n) in p)), -1) for n in names]
    best: list[tuple[float, tuple] | None] = [None] * len(phrases)
    for score, box, label in zip(res["scores"].tolist(), res["boxes"].tolist(), label_of):
        if 0 <= label < len(phrases) and score >= detector.threshold and (best[label] is None or score > best[label][0]):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            x0, x1 = max(0, min(x0, W - 1)), max(1, min(x1, W))
            y0, y1 = max(0, min(y0, H - 1)), max(1, min(y1, H))
            if x1 > x0 and y1 > y0:
                best[label] = (score, (x0, y0, x1, y1))
    return [b[1] if b else None for b in best]
