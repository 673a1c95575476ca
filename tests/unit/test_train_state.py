"""Nothing lost (issue 13, item 8): versioned resumable state, ``save_every``, a state on any error.

The state folder holds complete versions and a pointer (``state.json``) naming the current one; a new
version replaces the old only once it is complete. An error escaping the loop (out of memory included)
leaves the state of the last completed step, which resumes to the weights of an uninterrupted run.
"""

import json
import os

import pytest
import torch

import dynasyn.state as state_mod
from dynasyn.errors import DynASynError
from dynasyn.state import MARKER, POINTER, current_version, has_state, read_pointer, remove_owned
from dynasyn.tiny import tiny_components
from dynasyn.train import Cancelled, DynASynTrainer, OutOfMemory, TrainConfig
from tests.support.scene import tensor_aug_pairs, tensor_scene


def cfg(**kw):
    base = dict(mode="dynasyn", phase1_steps=2, phase2_steps=3, phase2_lr=1e-4, resolution=64, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def trainer(config, **kw):
    image, masks, nouns = tensor_scene()
    return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, augmented=tensor_aug_pairs(1),
                          device="cpu", log=kw.pop("log", lambda *_: None), **kw)


def weights(t):
    return {**{"unet." + k: v.clone() for k, v in t.c.unet.state_dict().items()},
            **{"te." + k: v.clone() for k, v in t.c.text_encoder.state_dict().items()}}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run every resumed run must reproduce bit for bit: weights after each step, losses."""
    t = trainer(cfg())
    after = {}
    t.callback = lambda e: after.__setitem__(e.step, weights(t))
    t.train()
    return after, [h.loss for h in t.history]


def versions(folder):
    return sorted(p.name for p in folder.iterdir() if state_mod.VERSION_RE.match(p.name))


def resume_to_end(folder, **kw):
    t = trainer(cfg(**kw))
    t.load_state(folder)
    start = t.step
    t.train()
    return start, t


def test_save_every_keeps_one_complete_version_behind_an_atomic_pointer(tmp_path, reference, monkeypatch):
    import dynasyn.train as train_mod

    folder = tmp_path / "state"
    t = trainer(cfg(save_every=2))
    saved_at = []
    real = train_mod.write_version
    monkeypatch.setattr(train_mod, "write_version", lambda f, meta, *a: saved_at.append(meta["step"]) or real(f, meta, *a))
    t.train(state_dir=folder)
    assert saved_at == [2, 4]  # every 2 completed steps (5 steps: not at the end)
    assert (folder / MARKER).is_file() and has_state(folder)
    meta = read_pointer(folder)
    assert meta["step"] == 4 and meta["format"] == 2 and versions(folder) == [meta["data"]]
    assert sorted(p.name for p in current_version(folder).iterdir()) == ["text_encoder.safetensors", "trainer.pt",
                                                                         "unet.safetensors"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    start, resumed = resume_to_end(folder)
    assert start == 4 and same(weights(resumed), reference[0][5])
    assert remove_owned(folder) and not folder.exists()


@pytest.mark.parametrize("where", ["writer", "pointer switch"])
def test_a_save_killed_midway_leaves_the_previous_version_current_and_loadable(tmp_path, monkeypatch, reference, where):
    """An exception inside the writer (a torn file), or a kill just before the pointer switch: the new version never
    becomes current, nothing of it stays, and the previous version resumes to the uninterrupted run's weights."""
    import safetensors.torch

    folder = tmp_path / "state"
    t = trainer(cfg(save_every=2))
    real_save_file, real_replace = safetensors.torch.save_file, os.replace

    def torn_save_file(tensors, path, *a, **k):
        if t.step == 4:
            open(path, "wb").write(b"half a file")
            raise KeyboardInterrupt  # the process is stopped while writing (not an Exception: nothing may catch it)
        return real_save_file(tensors, path, *a, **k)

    def killed_replace(src, dst):
        if t.step == 4 and str(dst).endswith(POINTER):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    if where == "writer":
        monkeypatch.setattr(safetensors.torch, "save_file", torn_save_file)
    else:
        monkeypatch.setattr(state_mod.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        t.train(state_dir=folder)
    monkeypatch.undo()
    assert read_pointer(folder)["step"] == 2
    assert versions(folder) == [read_pointer(folder)["data"]]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    start, resumed = resume_to_end(folder)
    assert start == 2 and same(weights(resumed), reference[0][5])


def test_leftovers_of_interrupted_saves_are_swept_on_start(tmp_path, reference):
    """What a kill -9 leaves (a temporary version, a temporary pointer, a version the pointer never named, a link)
    is removed when training starts; the current version and everything outside the folder stay."""
    folder = tmp_path / "state"
    first = trainer(cfg(), should_stop=lambda: first.step == 2)
    with pytest.raises(Cancelled):
        first.train(state_dir=folder)
    current = read_pointer(folder)["data"]
    (folder / ".tmp-v00000003-abc").mkdir()
    (folder / ".tmp-v00000003-abc" / "unet.safetensors").write_bytes(b"torn")
    (folder / ".tmp-x1y2.json").write_text("{")
    (folder / "v00000003-orphan").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (folder / ".tmp-link").symlink_to(outside)
    logged = []
    t = trainer(cfg(), log=logged.append)
    t.load_state(folder)
    t.train(state_dir=folder)
    assert any("interrupted save" in m and "v00000003-orphan" in m for m in logged)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, POINTER, current])
    assert (outside / "keep.txt").read_text() == "mine"
    assert same(weights(t), reference[0][5])


def _fail_in_step_at(t, step, error):
    """Raise ``error`` from inside step ``step`` (1-based), after its random draws and its forward pass."""
    real = t._step_targets

    def targets(*a):
        out = real(*a)
        if t.step + 1 == step:
            raise error
        return out

    t._step_targets = targets


def test_an_error_inside_a_step_saves_the_last_completed_step_which_resumes_bit_identical(tmp_path, reference):
    folder = tmp_path / "state"
    t = trainer(cfg())
    _fail_in_step_at(t, 4, ValueError("a bug in step 4"))
    with pytest.raises(ValueError, match="a bug in step 4") as err:
        t.train(state_dir=folder)
    assert any("Resumable state of step 3" in n for n in err.value.__notes__)
    assert read_pointer(folder)["step"] == 3
    start, resumed = resume_to_end(folder)
    assert start == 3 and same(weights(resumed), reference[0][5])
    assert [h.loss for h in resumed.history] == reference[1]


def test_an_error_in_the_callback_after_a_step_saves_that_step(tmp_path, reference):
    folder = tmp_path / "state"

    def callback(entry):
        if entry.step == 2:
            raise OSError("the progress display went away")

    with pytest.raises(OSError):
        trainer(cfg(), callback=callback).train(state_dir=folder)
    start, resumed = resume_to_end(folder)
    assert start == 2 and same(weights(resumed), reference[0][5])


@pytest.mark.parametrize("oom", [
    lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    lambda: RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),  # torch before the OOM type
    lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."),
], ids=["cuda-oom-type", "old-cuda-runtime-error", "cpu-allocator"])
def test_out_of_memory_saves_the_state_and_names_the_memory_options(tmp_path, reference, oom):
    folder = tmp_path / "state"
    t = trainer(cfg())
    error = oom()
    _fail_in_step_at(t, 3, error)
    with pytest.raises(OutOfMemory, match=r"Out of memory at step 3 \(cpu\): turn on gradient_checkpointing.*"
                                          r"Resumable state of step 2") as err:
        t.train(state_dir=folder)
    assert err.value.__cause__ is error  # the node hands torch's type to ComfyUI's own OOM handling
    start, resumed = resume_to_end(folder)
    assert start == 2 and same(weights(resumed), reference[0][5])


def test_an_update_cut_short_saves_nothing_and_keeps_the_last_saved_version(tmp_path):
    """An error inside the optimizer step leaves weights of no step: no state is written from it, ever."""
    folder = tmp_path / "state"
    t = trainer(cfg(save_every=2))
    real_setup = t._setup_phase

    def setup(phase):
        real_setup(phase)
        if phase == 2:
            real_step = t.optimizer.step

            def half_step():
                if t.step == 2:  # the first phase-2 step: part of the weights moved, then the device failed
                    with torch.no_grad():
                        next(t.c.unet.parameters()).add_(1.0)
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return real_step()

            t.optimizer.step = half_step

    t._setup_phase = setup
    with pytest.raises(RuntimeError, match="illegal memory access") as err:
        t.train(state_dir=folder)
    assert any("No resumable state was saved: step 3 stopped while its update was being applied" in n and
               "step 2, is kept" in n for n in err.value.__notes__)
    assert t.half_applied == 3 and t.save_state(folder) is None
    assert read_pointer(folder)["step"] == 2


def test_free_space_is_checked_before_a_state_is_written(tmp_path, monkeypatch):
    import re
    from collections import namedtuple

    folder = tmp_path / "state"
    usage = namedtuple("usage", "total used free")

    def callback(entry):
        if entry.step == 3:  # the disk fills up between the save of step 2 and that of step 4
            monkeypatch.setattr(state_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))

    t = trainer(cfg(save_every=2), callback=callback)
    need = t._state_bytes()
    with pytest.raises(DynASynError, match=rf"Not enough free disk space to write the training state into "
                                           rf"{re.escape(str(folder))}: it needs about [\d,]+ bytes .*5,000 bytes "
                                           rf"are free") as err:
        t.train(state_dir=folder)
    assert int(str(err.value).split("about ")[1].split(" bytes")[0].replace(",", "")) >= need
    monkeypatch.undo()
    assert read_pointer(folder)["step"] == 2 and len(versions(folder)) == 1


def test_cancel_right_after_a_periodic_save_writes_it_once(tmp_path, monkeypatch):
    import dynasyn.train as train_mod

    calls = []
    real = train_mod.write_version
    monkeypatch.setattr(train_mod, "write_version", lambda *a: calls.append(a[1]["step"]) or real(*a))
    t = trainer(cfg(save_every=2), should_stop=lambda: t.step == 2)
    with pytest.raises(Cancelled) as e:
        t.train(state_dir=tmp_path / "state")
    assert e.value.step == 2 and calls == [2]
    assert t.save_state(tmp_path / "state") == tmp_path / "state" and calls == [2]  # the node's own save after Cancel


def test_a_first_format_state_still_resumes_and_is_replaced_by_a_version(tmp_path, reference):
    """States written before versions (weights beside state.json) resume; the next save sweeps their files."""
    import shutil

    folder = tmp_path / "state"
    first = trainer(cfg(), should_stop=lambda: first.step == 2)
    with pytest.raises(Cancelled):
        first.train(state_dir=folder)
    data = current_version(folder)
    for f in data.iterdir():
        shutil.move(str(f), folder / f.name)
    data.rmdir()
    meta = read_pointer(folder)
    del meta["data"], meta["format"]
    (folder / POINTER).write_text(json.dumps(meta))
    t = trainer(cfg(save_every=1))
    t.load_state(folder)
    assert t.step == 2
    t.train(state_dir=folder)
    assert same(weights(t), reference[0][5])
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, POINTER, read_pointer(folder)["data"]])


def test_a_pointer_naming_anything_but_its_own_version_is_refused(tmp_path):
    folder = tmp_path / "state"
    t = trainer(cfg(), should_stop=lambda: t.step == 1)
    with pytest.raises(Cancelled):
        t.train(state_dir=folder)
    meta = read_pointer(folder)
    for bad in ("../outside", "/etc", "v00000001-missing"):
        (folder / POINTER).write_text(json.dumps({**meta, "data": bad}))
        with pytest.raises(DynASynError, match="names a version"):
            trainer(cfg()).load_state(folder)


def test_save_every_must_not_be_negative():
    with pytest.raises(DynASynError, match="save_every"):
        cfg(save_every=-1)
