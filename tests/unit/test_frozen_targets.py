"""Frozen-model targets precomputed (issue 14, "Memory and step cost").

L_ICA / L_AUG need only the frozen base model's class-prompt maps, and every random draw of a step is
fixed by the seed: the trainer computes them for every step before training, from copies of the
training streams, then frees the frozen copy. Same losses bit for bit, same streams, same resume.
"""

import gc
import weakref

import pytest
import torch

import dynasyn.train as train_mod
from dynasyn.errors import DynASynError
from dynasyn.tiny import tiny_components
from dynasyn.train import Cancelled, DynASynTrainer, TrainConfig
from tests.support.scene import tensor_aug_pairs, tensor_scene

LOSSES = ("masked_diffusion_loss", "masked_attention_loss", "inter_cross_attention_loss", "augmentation_loss")


def cfg(**kw):
    base = dict(phase1_steps=2, phase2_steps=2, phase2_lr=1e-4, resolution=64, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def trainer(config, device="cpu", **kw):
    image, masks, nouns = tensor_scene()
    return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, augmented=tensor_aug_pairs(2),
                          device=device, log=lambda *_: None, **kw)


def recorded_run(monkeypatch, config):
    """Train, recording every loss term's value and the class maps each L_ICA / L_AUG call got, per step."""
    seen = []
    for name in LOSSES:
        real = getattr(train_mod, name)

        def spy(*a, _name=name, _real=real):
            out = _real(*a)
            targets = a[1:2] if _name in ("inter_cross_attention_loss", "augmentation_loss") else ()
            seen.append((_name, out.detach().clone(), [x.detach().clone() for x in targets]))
            return out

        monkeypatch.setattr(train_mod, name, spy)
    t = trainer(config)
    frozen_at_step = []
    t.callback = lambda e: frozen_at_step.append(t.frozen is not None)
    t.train()
    monkeypatch.undo()
    return t, seen, frozen_at_step


@pytest.mark.parametrize("mode", ["dynasyn", "dynasyn_act"])
def test_precomputed_targets_give_bit_identical_losses_and_weights(monkeypatch, mode):
    per_step, seen_a, frozen_a = recorded_run(monkeypatch, cfg(mode=mode, precompute_targets=False))
    pre, seen_b, frozen_b = recorded_run(monkeypatch, cfg(mode=mode, precompute_targets=True))
    assert frozen_a == [True] * 4 and frozen_b == [False] * 4  # freed before the first step
    assert [n for n, *_ in seen_a] == [n for n, *_ in seen_b]
    expected = {"dynasyn": {"md", "m2a", "ica", "aug"}, "dynasyn_act": {"md", "m2a", "aug"}}[mode]
    assert {h for e in pre.history for h in e.terms} == expected
    assert sum(n == "augmentation_loss" for n, *_ in seen_b) == 4
    for (name, va, ta), (_, vb, tb) in zip(seen_a, seen_b):
        assert torch.equal(va, vb), name
        assert all(torch.equal(x, y) for x, y in zip(ta, tb)), name
    assert [h.terms for h in per_step.history] == [h.terms for h in pre.history]
    for k, v in per_step.c.unet.state_dict().items():
        assert torch.equal(v, pre.c.unet.state_dict()[k]), k


def test_precomputing_leaves_the_training_streams_as_they_are():
    t = trainer(cfg(mode="dynasyn"))
    gen, rng = t.gen.get_state().clone(), t.rng.getstate()
    assert t.precompute_targets(release=False)
    assert torch.equal(t.gen.get_state(), gen) and t.rng.getstate() == rng
    assert sorted(t.targets) == [0, 1, 2, 3] and t.frozen is not None
    assert all(ica.shape == (len(key[0]), 16, 16) and aug.shape == (2, 16, 16) for key, (ica, aug) in t.targets.values())


def test_the_frozen_copy_is_freed_once_every_remaining_step_has_its_target():
    t = trainer(cfg(mode="dynasyn"))
    gone = weakref.ref(t.frozen[0])
    t.precompute_targets(count=2)  # two of four steps: the copy is still needed
    assert t.frozen is not None and sorted(t.targets) == [0, 1]
    t.precompute_targets()
    gc.collect()
    assert t.frozen is None and t.class_hidden == {} and gone() is None
    t.train()
    assert t.targets == {}  # each used and dropped by its step


def test_train_reports_the_precomputation_to_target_progress_and_a_cancel_stops_it():
    t = trainer(cfg(mode="dynasyn"))
    seen = []
    t.target_progress = lambda done, total: seen.append((done, total))
    t.train()
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(t.history) == 4

    t = trainer(cfg(mode="dynasyn"))
    seen = []
    t.target_progress = lambda done, total: seen.append((done, total))
    t.should_stop = lambda: len(seen) == 2  # Cancel pressed while the targets are made
    with pytest.raises(Cancelled):
        t.train()
    assert seen == [(1, 4), (2, 4)] and t.step == 0 and sorted(t.targets) == [0, 1]


def test_targets_made_one_step_at_a_time_are_used_by_that_step(monkeypatch):
    """The benchmarks' path: ``precompute_targets(1, release=False)`` then ``training_step``, for any mode switch."""
    t = trainer(cfg(mode="dynasyn", phase1_steps=0))
    t._setup_phase(2)
    calls = []
    real = t._frozen_maps
    monkeypatch.setattr(t, "_frozen_maps", lambda *a: calls.append(t.step) or real(*a))
    for _ in range(2):
        t.precompute_targets(1, release=False)
        t.training_step()
    assert calls == [0, 1] and t.targets == {}


def test_a_target_drawn_for_another_step_is_refused():
    t = trainer(cfg(mode="dynasyn"))
    t.precompute_targets(release=False)
    key, maps = t.targets[0]
    t.targets[0] = ((tuple(reversed(key[0])) if len(key[0]) > 1 else (1 - key[0][0],), *key[1:]), maps)
    t._setup_phase(1)
    with pytest.raises(DynASynError, match="drawn for another step"):
        t.training_step()


def test_cancel_while_precomputing_then_resume_matches_the_uninterrupted_run(tmp_path):
    config = cfg(mode="dynasyn")
    full = trainer(config)
    full.train()
    asked = []
    first = trainer(config, should_stop=lambda: asked.append(1) or len(asked) == 3)
    with pytest.raises(Cancelled) as e:
        first.train(state_dir=tmp_path / "state")
    assert e.value.step == 0 and len(first.targets) == 2 and first.frozen is not None
    resumed = trainer(config)
    resumed.load_state(tmp_path / "state")
    resumed.train()
    assert [h.loss for h in resumed.history] == [h.loss for h in full.history]
    for k, v in full.c.unet.state_dict().items():
        assert torch.equal(v, resumed.c.unet.state_dict()[k]), k


@pytest.mark.parametrize("mode", ["dynasyn", "dynasyn_act"])
def test_precomputed_targets_live_on_the_trainers_device(mode):
    """On ``meta`` (a stand-in for CUDA, see test_gpu_paths): the targets and everything the step mixes them with are
    on the device, else torch refuses the op."""
    class Reached(Exception):
        pass

    t = trainer(cfg(mode=mode), device="meta")
    t.precompute_targets()
    assert t.frozen is None
    assert all(m is None or m.device.type == "meta" for _, maps in t.targets.values() for m in maps)

    def stop(value):
        raise Reached(value)

    t._setup_phase(1)
    t.dist.mean = stop  # the step's first use of its loss: every term was computed
    with pytest.raises(Reached) as hit:
        t.training_step()
    assert hit.value.args[0].device.type == "meta"
