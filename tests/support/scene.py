"""A 64 px two-subject test scene (a red 'panda' square and a blue 'bowl' box) with one mask PNG per subject."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

BOXES = {"panda": (6, 30, 6, 30), "bowl": (34, 60, 28, 60)}  # rows, cols


def write_scene(folder: Path, image_name: str = "scene.png", mask_names=("mask_panda.png", "mask_bowl.png")) -> Path:
    img = np.zeros((64, 64, 3), np.uint8) + 90
    img[6:30, 6:30] = (230, 60, 60)
    img[34:60, 28:60] = (60, 80, 230)
    Image.fromarray(img).save(folder / image_name)
    for name, (r0, r1, c0, c1) in zip(mask_names, BOXES.values()):
        m = np.zeros((64, 64), np.uint8)
        m[r0:r1, c0:c1] = 255
        Image.fromarray(m).save(folder / name)
    return folder


def tensor_scene(seed=0):
    """The same two subjects as tensors: image [64, 64, 3] on random ground, masks, class nouns."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(64, 64, 3, generator=g)
    masks = []
    for r0, r1, c0, c1 in BOXES.values():
        m = torch.zeros(64, 64)
        m[r0:r1, c0:c1] = 1
        masks.append(m)
    image[masks[0] > 0] = torch.tensor([0.9, 0.2, 0.2])
    image[masks[1] > 0] = torch.tensor([0.2, 0.3, 0.9])
    return image, masks, ["panda", "bowl"]


def tensor_aug_pairs(n: int):
    """``n`` augmented pairs ("a panda jumping into a bowl") on scenes of seeds 10, 11, ..."""
    from dynasyn.dataset import AugmentedPair

    out = []
    for k in range(n):
        img, masks, _ = tensor_scene(seed=10 + k)
        out.append(AugmentedPair(img, "a panda jumping into a bowl", [0, 1], torch.stack(masks)))
    return out
