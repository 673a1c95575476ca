"""The method learns: on the pretrained Shapes World model, Break-a-Scene-style training on ONE picture of two
novel patterned subjects makes the model draw them (their two colours in one region, scored by the identity
scorer) far more often than the untrained model draws a ball and a box in the same prompts.

The baseline is the class prior (each subject's token replaced by its class noun), as in DreamBooth's
comparisons: the world model knows two-colour patterns in other colour pairs, so asked in words ("a red and
yellow striped ball") it composes the novel colours without seeing the picture (measured 0.83 here); that
comparison is bench/fidelity.py's ``untrained`` row, which scores pattern and class as well."""

import numpy as np
import pytest
import torch

from dynasyn.shapes import identity as I
from dynasyn.shapes import world
from dynasyn.shapes.model import load_shapes_components, sample_images, to_uint8
from dynasyn.train import DynASynTrainer, TrainConfig

SUBJECTS = [I.NovelSubject("ball", "red", "yellow", "striped"), I.NovelSubject("box", "blue", "green", "checked")]
PROMPTS = [I.EvalPrompt((0, 1), relation="left of"), I.EvalPrompt((0,), pose="jumping"),
           I.EvalPrompt((0, 1), relation="on top of")]
SEEDS = range(6)


def colors_rate(comps, words):
    caps = [p.render(words) for p in PROMPTS for _ in SEEDS]
    seeds = [100 + s for _ in PROMPTS for s in SEEDS]
    imgs = to_uint8(sample_images(comps, caps, seeds, steps=20, guidance=5.0))
    prompts = [p for p in PROMPTS for _ in SEEDS]
    return float(np.mean([I.score(im, SUBJECTS, p)["colors"] for im, p in zip(imgs, prompts)]))


@pytest.mark.timeout(600)
def test_training_on_one_picture_makes_the_model_draw_the_novel_subjects():
    ref = I.novel_scene(SUBJECTS, PROMPTS[0], seed=1, background="beach")
    base = load_shapes_components()
    untrained = colors_rate(base, [f"a {s.cls}" for s in SUBJECTS])

    comps = load_shapes_components()
    cfg = TrainConfig(mode="break_a_scene", phase1_steps=200, phase2_steps=200, phase1_lr=5e-3, phase2_lr=5e-4,
                      resolution=world.SIZE, template="{}", prior_preservation=False)
    trainer = DynASynTrainer(comps, torch.from_numpy(ref.image).float() / 255, [torch.from_numpy(m).float() for m in ref.masks],
                             ["ball", "box"], cfg, device="cpu", log=lambda m: None)
    trainer.train()
    trained = colors_rate(comps, ["<asset0>", "<asset1>"])
    # measured on this machine with the released world model (sha256 0a1caa38…, 2026-12-07): trained 0.42, untrained
    # 0.03; with the 9,400-step one 0.31 / 0.06 (the pattern itself is rarer: see bench/fidelity.py); the bar leaves
    # slack for another CPU's rounding
    assert trained >= untrained + 0.15, (trained, untrained)
