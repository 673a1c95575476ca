"""A 64 px two-subject test scene (a red 'panda' square and a blue 'bowl' box) with one mask PNG per subject."""

from pathlib import Path

import numpy as np
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
