"""The identity / text / leakage scorer of learned subjects, judged on rendered scenes whose truth is known."""

import numpy as np
import pytest

from dynasyn.errors import DynASynError
from dynasyn.shapes import identity as I
from dynasyn.shapes import world

PAIRS = [("red", "yellow"), ("blue", "green"), ("orange", "blue"), ("purple", "yellow"), ("green", "red"),
         ("yellow", "purple")]


def _case(t: int, rng):
    a, b = PAIRS[t % 3 * 2], PAIRS[t % 3 * 2 + 1]
    classes = rng.choice(world.CLASSES, 2)
    pats = [str(p) for p in rng.choice(world.PATTERNS[1:], 2)]
    pats = ["striped" if c == "star" and p == "dotted" else p for c, p in zip(classes, pats)]  # a star is too thin for dots
    subs = [I.NovelSubject(str(classes[0]), *a, pats[0]), I.NovelSubject(str(classes[1]), *b, pats[1])]
    if t % 3 == 0:
        k = int(rng.integers(2))
        poses = [p for p in world.POSES if subs[k].cls in world.POSES[p]] + [""]
        return subs, I.EvalPrompt((k,), pose=str(rng.choice(poses)))
    return subs, I.EvalPrompt((0, 1) if t % 2 else (1, 0), relation=str(rng.choice(world.RELATIONS)))


def test_rendered_subjects_are_found_with_their_pattern_class_relation_and_pose():
    rng = np.random.default_rng(0)
    scores = []
    for t in range(150):
        subs, prompt = _case(t, rng)
        scores.append(I.score(I.novel_scene(subs, prompt, seed=t).image, subs, prompt))
    assert np.mean([s["identity"] for s in scores]) >= 0.98
    assert np.mean([s["pattern"] for s in scores]) >= 0.98
    assert np.mean([s["text"] for s in scores]) >= 0.98
    assert np.mean([s["leakage"] for s in scores]) <= 0.02


def test_plain_world_objects_are_not_the_subjects():
    rng = np.random.default_rng(1)
    ids = []
    for t in range(60):
        subs, prompt = _case(t, rng)
        ids.append(I.score(world.sample_scene(10**6 + t).image, subs, prompt)["colors"])
    assert max(ids) == 0.0


def test_wrong_pattern_colours_or_class_fail_identity_and_a_swapped_colour_is_leakage(monkeypatch):
    subs = [I.NovelSubject("ball", "red", "yellow", "striped"), I.NovelSubject("box", "blue", "green", "checked")]
    prompt = I.EvalPrompt((0, 1), relation="left of")
    good = I.novel_scene(subs, prompt, seed=3, background="snow")
    assert I.score(good.image, subs, prompt) == {"colors": 1.0, "identity": 1.0, "pattern": 1.0, "text": 1.0,
                                                "leakage": 0.0}
    # the right colours in two halves (one band per object), not the pattern
    monkeypatch.setattr(world, "PATTERN_BANDS", 1.0)
    halves = I.novel_scene(subs, prompt, seed=3, background="snow").image
    ball = I.find_subjects(halves, subs)[0]
    assert ball.identity(subs[0]) and not ball.pattern(subs[0])
    monkeypatch.undo()
    # the box painted with the ball's second colour: the box leaks the ball's look
    leaky = [subs[0], I.NovelSubject("box", "blue", "yellow", "checked")]
    img = I.novel_scene(leaky, prompt, seed=3, background="snow").image
    s = I.score(img, subs, prompt)
    assert s["identity"] == 0.5 and s["leakage"] > 0.1
    # the right colours on the wrong class
    wrong = [I.NovelSubject("cone", "red", "yellow", "striped"), subs[1]]
    wrong_class = I.score(I.novel_scene(wrong, prompt, seed=3).image, subs, prompt)
    assert wrong_class["identity"] == 0.5 and wrong_class["colors"] == 1.0
    # the reversed relation is not the prompt's
    assert I.score(good.image, subs, I.EvalPrompt((1, 0), relation="left of"))["text"] == 0.0


def test_bad_subjects_are_refused():
    with pytest.raises(DynASynError, match="pattern"):
        I.NovelSubject("ball", "red", "blue", "plain")
    with pytest.raises(DynASynError, match="colour"):
        I.NovelSubject("ball", "red", "pink", "striped")
    with pytest.raises(DynASynError, match="class"):
        I.NovelSubject("dog", "red", "blue", "striped")
