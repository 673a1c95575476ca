"""Shapes World: the renderer is a pure function of the seed, and the scorer reads its pictures back."""

import numpy as np
import pytest

from dynasyn.errors import DynASynError
from dynasyn.shapes import scorer, world


def test_renderer_is_deterministic_and_seeds_differ():
    a, b, c = world.sample_scene(123), world.sample_scene(123), world.sample_scene(124)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    assert a.describe() == b.describe()
    assert not np.array_equal(a.image, c.image)


def test_scene_has_caption_masks_and_description():
    for seed in range(40):
        s = world.sample_scene(seed)
        assert 1 <= len(s.objects) <= 3 and s.masks.shape == (len(s.objects), 64, 64)
        d = s.describe()
        assert d["caption"] == s.caption and len(d["objects"]) == len(s.objects)
        assert len({o.color for o in s.objects}) == len(s.objects)  # colours are distinct within a scene
        for o, m in zip(s.objects, s.masks):
            assert m.sum() > 20, (s.caption, o)
            # the object's own colour fills its mask
            mean = s.image[m].astype(float).mean(0)
            assert np.abs(mean - np.array(world.COLORS[o.color])).max() < 40
        spec = world.parse_caption(s.caption)
        assert [(o["cls"], o["color"], o["pose"]) for o in spec["objects"]] == [(o.cls, o.color, o.pose) for o in s.objects]
        assert spec["relation"] == s.relation


def test_world_covers_classes_colours_relations_poses_backgrounds():
    scenes = [world.sample_scene(s) for s in range(400)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.cls for o in objs} == set(world.CLASSES)
    assert {o.color for o in objs} == set(world.COLORS)
    assert {s.relation for s in scenes} - {""} == set(world.RELATIONS)
    assert {o.pose for o in objs} - {""} == set(world.POSES)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert any(len(s.objects) == 3 for s in scenes)


def test_scorer_reads_clean_renders():
    scores, per_object = [], []
    for seed in range(300):
        s = world.sample_scene(900_000 + seed)
        dets = scorer.detect(s.image)
        for o in s.objects:
            d = [x for x in dets if x.color == o.color]
            per_object.append(bool(d) and max(d, key=lambda x: x.area).cls == o.cls)
        scores.append(scorer.score_caption(s.image, s.caption, dets))
    summary = scorer.summarize(scores)
    assert np.mean(per_object) >= 0.98
    assert summary["satisfied"] >= 0.98, summary
    assert summary["relation"] >= 0.98 and summary["pose"] >= 0.98, summary


def test_scorer_rejects_wrong_captions():
    """The scorer is not a yes-machine: wrong class, colour, relation or pose are caught."""
    swap_rel = {"left of": "right of", "right of": "left of", "on top of": "under", "under": "on top of"}
    rejected, total = 0, 0
    for seed in range(200):
        s = world.sample_scene(700_000 + seed)
        o = s.objects[0]
        if s.relation in swap_rel:
            wrong = s.caption.replace(f" {s.relation} ", f" {swap_rel[s.relation]} ", 1)
        elif o.pose:
            wrong = s.caption.replace(world.pose_phrase(o.pose), world.pose_phrase("jumping" if o.pose != "jumping" else "tilted"))
        else:
            other = next(c for c in world.CLASSES if c != o.cls)
            wrong = s.caption.replace(f" {o.cls}", f" {other}", 1)
        total += 1
        rejected += not scorer.score_caption(s.image, wrong)["satisfied"]
    assert rejected / total >= 0.95


def test_scorer_on_blank_picture_finds_nothing():
    s = world.sample_scene(5)
    s.objects = []
    blank = world.render(s, 5).image
    assert scorer.detect(blank) == []
    assert not scorer.score_caption(blank, "a red ball")["satisfied"]


def test_bad_input_gives_clear_errors():
    with pytest.raises(DynASynError, match="colour and a class"):
        world.parse_caption("a photo of a dog")
    with pytest.raises(DynASynError, match="RGB"):
        scorer.detect(np.zeros((64, 64)))
    with pytest.raises(DynASynError, match="1-3 objects"):
        world.sample_scene(0, n_objects=5)


def test_known_patterns_never_wear_a_novel_subjects_colour_pair():
    """The world model learns what a pattern is from the pairs outside NOVEL_COLOR_PAIRS; the benchmark's and
    the demo's subjects wear only novel pairs, so each stays a look it never saw."""
    import importlib.util
    import sys
    from pathlib import Path

    from dynasyn.example_scene import SHAPES_SUBJECTS

    spec = importlib.util.spec_from_file_location("fidelity", Path(__file__).parents[2] / "bench" / "fidelity.py")
    fidelity = sys.modules["fidelity"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    try:
        spec.loader.exec_module(fidelity)
    finally:
        del sys.modules["fidelity"]
    novel = [frozenset(s.colors) for sc in fidelity.SCENES for s in sc.subjects]
    novel += [frozenset((c, c2)) for _, c, c2, _ in SHAPES_SUBJECTS]
    assert set(novel) <= world.NOVEL_COLOR_PAIRS
    for c in world.COLORS:
        assert world.known_partners(c), c  # every colour is seen patterned with some other colour
    patterned = 0
    for seed in range(300):
        plain, pat = world.sample_scene(seed), world.sample_scene(seed, patterned=0.7)
        # the same scene (so the plain training set does not move), only its objects' looks differ
        assert [(o.cls, o.color, o.cx, o.cy, o.pose) for o in plain.objects] == \
               [(o.cls, o.color, o.cx, o.cy, o.pose) for o in pat.objects]
        for o in pat.objects:
            if o.pattern != "plain":
                patterned += 1
                assert frozenset((o.color, o.color2)) not in world.NOVEL_COLOR_PAIRS
                assert f"{o.color} and {o.color2} {o.pattern} {o.cls}" in pat.caption
        assert len({c for o in pat.objects for c in (o.color, o.color2) if c}) == \
               len(pat.objects) + sum(o.pattern != "plain" for o in pat.objects)  # colours stay distinct
        spec = world.parse_caption(pat.caption)
        assert [(o["cls"], o["color"]) for o in spec["objects"]] == [(o.cls, o.color) for o in pat.objects]
    assert patterned > 200
