"""The run store (dynasyn/runs.py): content keys, names, atomic folders, the untrusted run label, continuing."""

import os
from collections import namedtuple
from dataclasses import replace

import pytest
import torch

from dynasyn import runs
from dynasyn.errors import DynASynError
from dynasyn.tiny import tiny_components
from dynasyn.train import DynASynTrainer, TrainConfig
from tests.support.scene import tensor_aug_pairs, tensor_scene as scene

BASE = {"unet": "u", "clip": "c", "vae": "v"}


def key(**kw):
    image, masks, nouns = scene()
    args = dict(picture=image, masks=masks, class_nouns=nouns, base_model=BASE, config=TrainConfig(resolution=64),
                memory_preset="auto", dataset=[])
    args.update(kw)
    return runs.run_key(**args)


def test_the_key_changes_with_every_input_that_decides_the_weights():
    image, masks, nouns = scene()
    k = key()
    assert k == key() and len(k) == 64
    other_image = image.clone()
    other_image[0, 0, 0] += 1 / 255
    other_masks = [m.clone() for m in masks]
    other_masks[1][0, 0] = 1
    changed = [key(picture=other_image), key(masks=other_masks), key(class_nouns=["panda", "cup"]),
               key(base_model={**BASE, "vae": "w"}), key(memory_preset="12 GB"),
               *(key(config=TrainConfig(resolution=64, **{f: v})) for f, v in
                 [("seed", 1), ("phase2_steps", 401), ("lambda_ica", 0.02), ("mode", "dynasyn_md"), ("optimizer", "adafactor"),
                  ("mixed_precision", "no"), ("train_text_encoder", False), ("aspect", "pad")]),
               key(dataset=tensor_aug_pairs(1))]
    assert len(set(changed)) == len(changed) and k not in changed
    # how training runs (not what it trains) is not part of the key; nor are pairs a mode does not train on
    assert key(config=TrainConfig(resolution=64, gradient_checkpointing=True)) == k
    assert "save_every" in runs.NON_RESULT_SETTINGS
    md = TrainConfig(resolution=64, mode="dynasyn_md")
    assert key(config=md, dataset=tensor_aug_pairs(1)) == key(config=md)
    assert runs.continued_key(k, 5) != runs.continued_key(k, 6) != k


def test_embedding_names_are_valid_and_distinct():
    assert runs.embedding_names("run", ["panda", "teddy bear", "Panda", "a/b:c", "…"]) == [
        "run_panda", "run_teddy_bear", "run_Panda_2", "run_a_b_c", "run_subject5"]
    long = runs.embedding_names("r" * 90, ["x" * 50, "x" * 50])
    assert all(len(n) <= 100 for n in long) and len(set(long)) == 2
    with pytest.raises(DynASynError, match="refused"):
        runs.embedding_names("../x", ["panda"])


def test_free_prefix_skips_names_whose_embeddings_exist(tmp_path):
    (tmp_path / "run_bowl.safetensors").write_bytes(b"")
    assert runs.free_prefix(tmp_path, "run", ["panda", "bowl"]) == "run_001"
    assert runs.free_prefix(tmp_path, "run", ["panda"]) == "run"


def test_scene_prompt():
    words = ["embedding:a", "embedding:b"]
    assert runs.scene_prompt("", words) == "a photo of embedding:a and embedding:b"
    assert runs.scene_prompt(" [2]  chasing\n[1] ", words) == "embedding:b chasing embedding:a"
    for bad in ("[3]", "[0] [1]", "no markers"):
        with pytest.raises(DynASynError, match=r"\[1\]…\[2\]"):
            runs.scene_prompt(bad, words)


def meta(n=2):
    return {"prefix": "r", "class_nouns": ["panda", "bowl"][:n], "tokens": ["<asset0>", "<asset1>"][:n],
            "embeddings": ["r_panda", "r_bowl"][:n], "steps": 4, "config": {}, "base_model": BASE}


def store(root, name="r", k=None, files=None, **extra):
    return runs.save_run(root, name, k or key(), {**meta(), **extra}, [{"step": 1}],
                         files or {"embeddings.safetensors": {"<asset0>": torch.ones(4), "<asset1>": torch.zeros(4)}})


def test_save_list_resolve_and_find(tmp_path):
    k = key()
    record = store(tmp_path, k=k)
    assert record.label == f"r/{k[:16]}" and runs.list_runs(tmp_path) == [record.label]
    assert record.words == ["embedding:r_panda", "embedding:r_bowl"] and record.history() == [{"step": 1}]
    assert runs.resolve_run(tmp_path, record.label).key == k
    assert runs.find_run(tmp_path, k).folder == record.folder and runs.find_run(tmp_path, "0" * 64) is None
    assert torch.equal(record.tensors("embeddings.safetensors")["<asset0>"], torch.ones(4))
    assert record.tensors("unet.safetensors") == {}  # nothing trained there: no file
    record.update(exports={"checkpoint": "r"})
    assert runs.resolve_run(tmp_path, record.label).meta["exports"] == {"checkpoint": "r"}
    # the same key again replaces the run once the new one is complete; a leftover half-written folder is swept
    (tmp_path / "r" / f".{k[:16]}.deadbeef").mkdir()
    again = store(tmp_path, k=k, files={"embeddings.safetensors": {"<asset0>": torch.zeros(4), "<asset1>": torch.zeros(4)}})
    assert runs.list_runs(tmp_path) == [again.label]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [k[:16]]
    assert torch.equal(again.tensors("embeddings.safetensors")["<asset0>"], torch.zeros(4))


def test_a_failed_write_leaves_nothing_and_the_old_run_intact(tmp_path, monkeypatch):
    k = key()
    old = store(tmp_path, k=k)

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        store(tmp_path, k=k)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [k[:16]]
    assert runs.resolve_run(tmp_path, old.label).meta["steps"] == 4


def test_the_run_label_is_untrusted(tmp_path):
    record = store(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    store(outside, name="x", k="0123456789abcdef" + "0" * 48)
    os.symlink(outside / "x", tmp_path / "linked")                                   # a symlinked run name
    (tmp_path / "r" / "fedcba9876543210").symlink_to(outside / "x" / "0123456789abcdef")  # a symlinked run
    (tmp_path / "r" / "aaaaaaaaaaaaaaaa").mkdir()                                    # no marker, no run.json
    assert runs.list_runs(tmp_path) == [record.label]
    for bad in ["../x", str(outside / "x" / "0123456789abcdef"), f"r/../../{outside.name}/x/0123456789abcdef",
                "linked/0123456789abcdef", "r/fedcba9876543210", "r/aaaaaaaaaaaaaaaa", record.label + "/", "r", "",
                None, ["r"], "x" * 10000]:
        with pytest.raises(DynASynError, match="is not a finished run"):
            runs.resolve_run(tmp_path, bad)


def test_malformed_metadata_gives_a_clear_error(tmp_path):
    record = store(tmp_path)
    (record.folder / "run.json").write_text("{not json")
    with pytest.raises(DynASynError, match="unreadable"):
        runs.resolve_run(tmp_path, record.label)
    import json

    bad = {**meta(), "format": 1, "key": record.key, "name": "r", "embeddings": ["../../evil", "b"]}
    (record.folder / "run.json").write_text(json.dumps(bad))
    with pytest.raises(DynASynError, match="refused"):
        runs.resolve_run(tmp_path, record.label)
    (record.folder / "run.json").write_text(json.dumps({**bad, "embeddings": ["a"]}))
    with pytest.raises(DynASynError, match="lists 2 subjects but 1 embeddings"):
        runs.resolve_run(tmp_path, record.label)


def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12, 2 ** 30))
    big = {"unet.safetensors": {"w": torch.empty(0)}}
    monkeypatch.setattr(runs, "tensor_bytes", lambda *sds: 5 * 2 ** 30)
    with pytest.raises(DynASynError, match=r"needs about 5.00 GiB .* has 1.00 GiB free"):
        store(tmp_path, files=big)
    assert runs.list_runs(tmp_path) == [] and not [p for p in (tmp_path / "r").iterdir()]


def test_continue_from_a_stored_run_is_where_it_ended_and_reproducible(tmp_path):
    image, masks, nouns = scene()
    cfg = TrainConfig(phase1_steps=2, phase2_steps=2, resolution=64, seed=0)

    def trainer(config):
        return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, device="cpu", log=lambda *_: None)

    base = trainer(cfg)
    base_unet = {k: v.clone() for k, v in base.c.unet.state_dict().items()}
    base.train()
    trained = {k: v.clone() for k, v in base.c.unet.state_dict().items()}
    te = {k: v[:49408].clone() if k.endswith("token_embedding.weight") else v.clone()
          for k, v in base.c.text_encoder.state_dict().items()}
    unet = {k: v for k, v in trained.items() if not torch.equal(v, base_unet[k])}
    files = {"unet.safetensors": unet, "text_encoder.safetensors": te, "embeddings.safetensors": base.placeholder_embeddings()}
    record = runs.save_run(tmp_path, "r", key(), {**meta(), "steps": base.step}, [
        {"step": h.step, "phase": h.phase, "loss": h.loss, "terms": h.terms, "lr": h.lr, "subjects": h.subjects}
        for h in base.history], files)
    more = replace(cfg, phase2_steps=4)
    results = []
    for _ in range(2):
        t = trainer(more)
        runs.continue_from(t, record)
        assert t.step == 4 and [h.loss for h in t.history] == [h.loss for h in base.history]
        assert all(torch.equal(t.c.unet.state_dict()[k], v) for k, v in trained.items())
        assert all(torch.equal(t.placeholder_embeddings()[k], v) for k, v in base.placeholder_embeddings().items())
        t.train()
        assert t.step == 6 and [h.step for h in t.history] == [1, 2, 3, 4, 5, 6]
        results.append({k: v.clone() for k, v in t.c.unet.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], trained[k]) for k in trained)
    other = DynASynTrainer(tiny_components(seed=0), image, masks[:1], nouns[:1], cfg, device="cpu", log=lambda *_: None)
    with pytest.raises(DynASynError, match="has the subjects"):
        runs.continue_from(other, record)
