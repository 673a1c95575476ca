"""The bundled example: one 512x512 picture holding two subjects (a red ball, a blue box) and their masks.

Drawn here, deterministically, rather than stored as a binary: shaded so the subjects have form,
on a wooden table against a wall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE = "dynasyn_example.png"
MASKS = ("dynasyn_example_mask_1.png", "dynasyn_example_mask_2.png")
CLASS_NOUNS = "ball, box"
SIZE = 512


def draw(size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB uint8 [H, W, 3] and one bool mask per subject."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(0)
    wall = np.stack([0.86 - 0.1 * y, 0.82 - 0.1 * y, 0.74 - 0.08 * y], -1)
    grain = 0.04 * np.sin(90 * y + 6 * np.sin(12 * x)) + 0.02 * rng.standard_normal((size, size))
    table = np.stack([0.55 + grain, 0.36 + grain * 0.8, 0.2 + grain * 0.5], -1)
    img = np.where((y > 0.58)[..., None], table, wall)

    # subject 1: a red ball, lit from the upper left, with a soft shadow
    cx, cy, r = 0.3, 0.6, 0.16
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2
    ball = d2 <= 1
    shadow = ((x - cx - 0.04) / (1.3 * r)) ** 2 + ((y - cy - r) / (0.25 * r)) ** 2 <= 1
    img = np.where((shadow & ~ball)[..., None], img * 0.6, img)
    nz = np.sqrt(np.clip(1 - d2, 0, 1))
    light = np.clip(0.25 + 0.75 * (-(x - cx) / r * 0.45 - (y - cy) / r * 0.55 + nz * 0.7), 0, 1)
    spec = np.clip(1 - (((x - cx + 0.05) ** 2 + (y - cy + 0.06) ** 2) / (0.035 ** 2)), 0, 1) ** 2
    ball_rgb = np.stack([0.85 * light + spec, 0.12 * light + spec, 0.1 * light + spec], -1)
    img = np.where(ball[..., None], ball_rgb, img)

    # subject 2: a blue box (front face + top face), standing on the table
    x0, x1, top, bottom, depth = 0.56, 0.84, 0.4, 0.76, 0.06
    front = (x >= x0) & (x <= x1) & (y >= top) & (y <= bottom)
    lid = (y >= top - depth) & (y < top) & (x >= x0 + (top - y)) & (x <= x1 + (top - y))
    side = (x > x1) & (x <= x1 + depth) & (y >= top - (x - x1)) & (y <= bottom - (x - x1))
    img = np.where(((x > x1) & (x < x1 + 0.1) & (y > bottom - 0.02) & (y < bottom + 0.02) & ~side)[..., None], img * 0.6, img)
    img = np.where(front[..., None], np.stack([0.15 + 0.05 * y, 0.3 + 0.05 * y, 0.75 - 0.1 * y], -1), img)
    img = np.where(lid[..., None], np.array([0.35, 0.5, 0.9], np.float32), img)
    img = np.where(side[..., None], np.array([0.08, 0.18, 0.5], np.float32), img)
    rgb = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return rgb, [ball, front | lid | side]


def write(folder: str | Path) -> dict:
    """Writes the picture and its masks into ``folder`` (ComfyUI's input folder); returns their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb, masks = draw()
    Image.fromarray(rgb).save(folder / IMAGE)
    for name, m in zip(MASKS, masks):
        Image.fromarray((m * 255).astype(np.uint8)).convert("RGB").save(folder / name)
    return {"image": IMAGE, "masks": list(MASKS), "class_nouns": CLASS_NOUNS}
