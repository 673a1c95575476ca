"""scripts/train_shapes_world.py's mirror pairs: a lateral scene seen in a mirror is the scene of the other word."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dynasyn.shapes import scorer, world

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes_world.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_shapes_world", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_mirrored_caption_swaps_only_the_lateral_words(trainer):
    assert trainer.mirrored_caption("a red ball left of a blue box on the beach") == "a red ball right of a blue box on the beach"
    assert trainer.mirrored_caption("an orange star right of a green ring left of a red cone") == \
        "an orange star left of a green ring right of a red cone"
    assert trainer.mirrored_caption("a red ball on top of a blue box") == "a red ball on top of a blue box"


def test_a_mirrored_lateral_scene_satisfies_the_mirrored_caption(trainer):
    seen = 0
    for seed in range(400):
        s = world.sample_scene(seed)  # plain scenes: the scorer finds an object by its one colour
        if s.relation not in ("left of", "right of"):
            continue
        seen += 1
        flipped = np.ascontiguousarray(s.image[:, ::-1])
        assert scorer.score_caption(s.image, s.caption)["relation"], s.caption
        assert scorer.score_caption(flipped, trainer.mirrored_caption(s.caption))["relation"], s.caption
        assert not scorer.score_caption(flipped, s.caption)["relation"], s.caption  # the word is all that differs
    assert seen >= 40


def test_stripes_and_dots_are_mirror_symmetric_and_checks_are_not():
    """Why --mirror-pairs leaves scenes with a checked object out: mirrored, a check swaps its two colours."""
    for pattern, symmetric in (("striped", True), ("dotted", True), ("checked", False)):
        o = world.SceneObject(cls="box", color="red", size=10.0, cx=23.0, cy=40.0, pattern=pattern, color2="blue")
        m = world.SceneObject(cls="box", color="red", size=10.0, cx=world.SIZE - 23.0, cy=40.0, pattern=pattern,
                              color2="blue")
        ys, xs = np.mgrid[0:world.SIZE, 0:world.SIZE] + 0.5
        box = (abs(xs - m.cx) < m.size) & (abs(ys - m.cy) < m.size)  # the mirrored object's square
        same = (world.pattern_mask(o, 1)[:, ::-1] == world.pattern_mask(m, 1))[box].mean()
        assert same == 1.0 if symmetric else same < 0.1, (pattern, same)
