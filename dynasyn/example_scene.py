"""The bundled example scenes: one picture holding two subjects, their masks and class nouns, drawn in code.

Drawn here, deterministically, rather than stored as binaries, so the shipped workflows (DynASyn Example
Scene), the demo and the tests share one picture and nothing has to be downloaded or uploaded.

* ``ball and box`` (512 px, for SD 1.5 / 2.1): a red ball and a blue box on a wooden table against a wall,
  shaded so the subjects have form.
* ``dotted ball and striped box`` (64 px, for the Shapes World model): a green ball with blue dots and a
  red-and-yellow striped box, subjects the Shapes World model never saw (no object of its training wore these
  colour pairs), drawn by the world's own renderer, so learning them is the personalization task itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DynASynError


@dataclass(frozen=True)
class ExampleScene:
    image: np.ndarray   # [H, W, 3] uint8 RGB
    masks: np.ndarray   # [N, H, W] bool, one per subject, in class-noun order
    class_nouns: str    # "ball, box"
    caption: str        # what the picture shows, in words


def draw_ball_and_box(size: int = 512) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB uint8 [H, W, 3] and one bool mask per subject (a red ball, a blue box)."""
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


def _ball_and_box() -> ExampleScene:
    rgb, masks = draw_ball_and_box()
    return ExampleScene(rgb, np.stack(masks), "ball, box", "a red ball next to a blue box on a wooden table")


# The Shapes World pair's subjects: looks the released world model draws when asked in words, so learning them from
# the picture is within its reach. A novel pair of colours each (no training object wore them). The box was
# red-and-purple until 2026-12-07: the world's VAE keeps that look, but the model, asked in words for "a red and
# purple striped box", drew its colours in 0 of 24 pictures, and the demo never drew the box (0 of 8 in each of 4
# training seeds). "a red and yellow striped box" is drawn in words 8 of 8 times and by the demo in 8, 8, 7 and 8
# of 8 (training seeds 0-3; the ball 7, 5, 3 and 7). The VAE keeps the ball's class and colours in 79 % of 24 round
# trips (the striped red-and-yellow ball first shipped here: 21 %) and the box's in 42 %, but both in the demo's
# own picture (tests/unit/test_example_scene.py).
SHAPES_SUBJECTS = (("ball", "green", "blue", "dotted"), ("box", "red", "yellow", "striped"))


def _shapes_pair() -> ExampleScene:
    from .shapes import identity

    subjects = [identity.NovelSubject(*s) for s in SHAPES_SUBJECTS]
    scene = identity.novel_scene(subjects, identity.EvalPrompt((0, 1), relation="left of"), seed=1, background="grass")
    return ExampleScene(scene.image, scene.masks, "ball, box", scene.caption)


# combo label -> drawing; the first is the default. Labels say the size and the model the scene is for.
SCENES = {
    "ball and box, 512 px (SD 1.5 / 2.1)": _ball_and_box,
    "dotted ball and striped box, 64 px (Shapes World)": _shapes_pair,
}
BALL_AND_BOX, SHAPES_PAIR = SCENES
# earlier labels -> today's scene, so a workflow saved with one still runs (the Shapes World pair was renamed
# when its subjects changed to ones the world's VAE can draw)
RENAMED = {"striped ball and checked box, 64 px (Shapes World)": SHAPES_PAIR}


def example_scene(name: str) -> ExampleScene:
    """The named example scene (a key of SCENES, or an earlier label of one)."""
    name = RENAMED.get(name, name)
    if name not in SCENES:
        raise DynASynError(f"Unknown example scene {name!r}; choose one of: {'; '.join(SCENES)}.")
    return SCENES[name]()
