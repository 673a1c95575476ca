"""Step 3 of augmentation: Segment Anything masks from box / point prompts, one mask per subject.

Weights are the official ``sam_vit_b/l/h`` checkpoints (ComfyUI: ``models/sams``), built through
segment-anything's registry and loaded with ``torch.load(weights_only=True)``. The official
builders hard-code the full 1024 px model, so tests and the built-in demo use ``build_tiny_sam``
(same classes, test size), saved and loaded through the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DynASynError

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")
SAM_FILES = "sam_vit_b_01ec64.pth (vit_b), sam_vit_l_0b3195.pth (vit_l) or sam_vit_h_4b8939.pth (vit_h)"


@dataclass
class SubjectPrompt:
    """Where one subject is: a box (x0, y0, x1, y1) and/or points [(x, y), ...] with labels (1 = on it, 0 = not)."""
    box: tuple[float, float, float, float] | None = None
    points: Sequence[tuple[float, float]] = ()
    labels: Sequence[int] = ()

    def __post_init__(self):
        if self.box is None and not self.points:
            raise DynASynError("A SAM prompt needs a box or at least one point.")
        if self.points and len(self.labels) not in (0, len(self.points)):
            raise DynASynError("Give one label per point (1 = on the subject, 0 = background).")


def build_tiny_sam(seed: int = 0, img_size: int = 64):
    """A SAM of the real architecture at test size (ViT depth 1, width 32, ``img_size`` px input).

    Its masks fill the prompt box (see ``mask_threshold`` below); points alone select everything.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grid = img_size // 8
        sam = Sam(
            image_encoder=ImageEncoderViT(img_size=img_size, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2,
                                          out_chans=32, qkv_bias=True, use_rel_pos=True, window_size=0,
                                          global_attn_indexes=()),
            prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(grid, grid),
                                         input_image_size=(img_size, img_size), mask_in_chans=8),
            mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
                                     transformer_dim=32, iou_head_depth=1, iou_head_hidden_dim=32),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    # Random weights know no objects: accept every logit, so a box prompt yields its box (clipped) and
    # graphs built on the test-size SAM get usable, predictable masks.
    sam.mask_threshold = float("-inf")
    return sam.eval()


def model_type_from_name(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    for t in MODEL_TYPES:
        if t in name:
            return t
    raise DynASynError(f"Cannot tell the SAM size from {Path(path).name!r}; its name must contain vit_b, vit_l or vit_h "
                       f"(the official files: {SAM_FILES}).")


def load_sam(path: str | os.PathLike, model_type: str | None = None, device="cpu"):
    """A SAM from a ``.pth`` state dict; ``model_type`` from the file name when not given."""
    path = Path(path)
    if not path.is_file():
        raise DynASynError(f"SAM weights not found: {path}. Put {SAM_FILES} in ComfyUI/models/sams.")
    model_type = model_type or model_type_from_name(path)
    if model_type == "tiny":
        sam = build_tiny_sam()
    else:
        from segment_anything import sam_model_registry
        sam = sam_model_registry[model_type](checkpoint=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file gets the same advice
        raise DynASynError(f"{path.name} is not a SAM {model_type} checkpoint ({str(e).splitlines()[0][:200]}). "
                           f"Use the official files: {SAM_FILES}.") from e
    return sam.to(device).eval()


def save_sam(sam, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DynASynError(f"SAM needs one RGB image [H, W, 3]; got {tuple(image.shape)} (pick one image of a batch).")
    return (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def segment(sam, image: torch.Tensor, prompts: Sequence[SubjectPrompt], *, clip_to_box: bool = True) -> torch.Tensor:
    """One mask per subject prompt: [S, H, W] float in {0, 1}. The image embedding is computed once.

    ``sam`` is a SAM model, or any segmenter with ``segment_prompts(image, prompts) -> [S, H, W]`` (the
    Shapes World's exact one, ``dynasyn.shapes.segmenter``). ``clip_to_box`` keeps only the part of a mask
    inside its prompt box (SAM sometimes spills onto neighbours, which would make a pseudo-mask cover two
    subjects).
    """
    if not prompts:
        raise DynASynError("No SAM prompts: give a box or points for each subject.")
    if hasattr(sam, "segment_prompts"):
        out = sam.segment_prompts(image, prompts).float()
    else:
        out = _sam_predict(sam, image, prompts)
    if clip_to_box:
        for i, p in enumerate(prompts):
            if p.box is not None:
                x0, y0, x1, y1 = (int(round(v)) for v in p.box)
                keep = torch.zeros_like(out[i])
                keep[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1
                out[i] = out[i] * keep
    return out


def _sam_predict(sam, image: torch.Tensor, prompts: Sequence[SubjectPrompt]) -> torch.Tensor:
    from segment_anything import SamPredictor

    pixels = _to_uint8(image)
    h, w = pixels.shape[:2]
    predictor = SamPredictor(sam)
    predictor.set_image(pixels)
    out = torch.zeros(len(prompts), h, w)
    for i, p in enumerate(prompts):
        coords = np.asarray(p.points, dtype=np.float32).reshape(-1, 2) if p.points else None
        labels = np.asarray(p.labels or [1] * len(p.points), dtype=np.int64) if p.points else None
        box = np.asarray(p.box, dtype=np.float32) if p.box is not None else None
        masks, _, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box, multimask_output=False)
        out[i] = torch.from_numpy(masks[0]).float()
    return out
