"""The bundled example as files in ComfyUI's input folder (for LoadImage / LoadImageMask and the demo's --image path).

The picture itself is drawn by the library (dynasyn/example_scene.py), shared with the DynASyn Example Scene node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dynasyn.example_scene import BALL_AND_BOX, draw_ball_and_box as draw, example_scene  # noqa: F401 (draw: re-export)

IMAGE = "dynasyn_example.png"
MASKS = ("dynasyn_example_mask_1.png", "dynasyn_example_mask_2.png")
CLASS_NOUNS = example_scene(BALL_AND_BOX).class_nouns
SIZE = 512


def write(folder: str | Path) -> dict:
    """Writes the picture and its masks into ``folder`` (ComfyUI's input folder); returns their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb, masks = draw(SIZE)
    Image.fromarray(rgb).save(folder / IMAGE)
    for name, m in zip(MASKS, masks):
        Image.fromarray((m * 255).astype(np.uint8)).convert("RGB").save(folder / name)
    return {"image": IMAGE, "masks": list(MASKS), "class_nouns": CLASS_NOUNS}
