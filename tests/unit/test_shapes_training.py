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
