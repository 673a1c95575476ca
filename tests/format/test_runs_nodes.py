"""Content-addressed runs, in-process with ComfyUI 0.3.75's modules and the tiny model made native by the bridge:
Train loads a finished run of the same inputs instead of training, Load Run / Continue Training / Scene Prompt,
sample_every / save_every / LOSS_MAP / save_as, the trained MODEL held as base-dtype patches, and every new
input's bad values (the untrusted run combo included)."""

import importlib
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.format.test_node_failures import comfy_progress_hook, dirs, tiny, train_inputs  # noqa: F401  (fixtures)


def _mod(name):
    return importlib.import_module(f"dynasyn_pack.{name}")


@pytest.fixture
def tn(pack):
    return _mod("nodes.train_node")


@pytest.fixture
def no_training(tn, monkeypatch):
    """Fails the test if a trainer is made (a finished run must be loaded, not trained again)."""
    def refuse(*a, **k):
        raise AssertionError("a trainer was made: the run was trained again")
    monkeypatch.setattr(tn, "DynASynTrainer", refuse)


@pytest.fixture
def embeddings_seen(tiny, dirs, monkeypatch):
    """The tiny CLIP reads embedding:<name> from the test's embeddings folder."""
    clip = tiny[1]
    monkeypatch.setattr(clip.tokenizer.clip_l, "embedding_directory", [str(dirs / "embeddings")])


def quick(tiny, **kw):
    return train_inputs(tiny, **{"phase1_steps": 2, "phase2_steps": 2, "preview_every": 0, **kw})


def sample_latent(model, clip, prompt):
    import nodes

    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    out = nodes.common_ksampler(model, 1, 3, 5.0, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 32, 32)})
    return out[0]["samples"]


def patch_tensors(patcher):
    patcher = getattr(patcher, "patcher", patcher)  # a CLIP's ModelPatcher
    return {k: v[-1][1][1][0] for k, v in patcher.patches.items()}


def same_patches(a, b):
    pa, pb = patch_tensors(a), patch_tensors(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def runs_root(dirs):
    return dirs / "user" / "__dynasyn" / "runs"


# ---------------------------------------------------------------------------------------------- reuse
def test_the_same_inputs_load_the_finished_run_instead_of_training(pack, tn, tiny, dirs, monkeypatch, embeddings_seen):
    first = tn.DynASynTrain().train(**quick(tiny))["result"]
    model, clip, prompt, curve, run, samples, loss_map = first
    assert prompt == "a photo of embedding:lost_panda and embedding:lost_bowl"
    assert run.words == ("embedding:lost_panda", "embedding:lost_bowl") and run.steps == 4
    listed = _mod("dynasyn.runs").list_runs(runs_root(dirs))
    assert listed == [run.label] and run.label.startswith("lost/")
    made = []
    real = tn.DynASynTrainer
    monkeypatch.setattr(tn, "DynASynTrainer", lambda *a, **k: made.append(1) or real(*a, **k))
    # what does not change the weights (progress, samples, save_as, even run_name) finds the run
    again = tn.DynASynTrain().train(**quick(tiny, preview_every=3, run_name="other", save_as="embeddings"))["result"]
    assert made == []
    assert same_patches(model, again[0]) and same_patches(clip, again[1])
    assert again[2] == prompt and again[4] == run and again[6] == loss_map
    assert torch.equal(again[3], curve) and torch.equal(again[5], samples)
    assert torch.equal(sample_latent(model, clip, prompt), sample_latent(again[0], again[1], again[2]))
    # what changes the weights trains; force_retrain trains the same inputs again (same result: same seed)
    tn.DynASynTrain().train(**quick(tiny, lambda_m2a=0.02))
    assert made == [1]
    forced = tn.DynASynTrain().train(**quick(tiny, force_retrain=True))["result"]
    assert made == [1, 1] and same_patches(model, forced[0])
    assert forced[2] == "a photo of embedding:lost_002_panda and embedding:lost_002_bowl"  # new names, none overwritten


def test_a_changed_mask_or_base_model_is_another_run(pack, tn, tiny, dirs, monkeypatch):
    runs = _mod("dynasyn.runs")
    tn.DynASynTrain().train(**quick(tiny))
    masks = quick(tiny)["masks"].clone()
    masks[0, 0, 0] = 1 - masks[0, 0, 0]
    tn.DynASynTrain().train(**quick(tiny, masks=masks))
    model, clip, vae = tiny
    lora = model.clone()
    key = next(iter(lora.model.diffusion_model.state_dict()))
    lora.add_patches({"diffusion_model." + key: ("diff", (torch.full_like(lora.model.diffusion_model.state_dict()[key], 1e-3),))})
    tn.DynASynTrain().train(**quick(tiny, model=lora))
    assert len(runs.list_runs(runs_root(dirs))) == 3


def test_the_base_fingerprint_ignores_a_loaded_clones_patches_but_not_the_models_own(pack, tiny):
    """ComfyUI bakes a loaded clone's patches into the shared weights (keeping the originals in ``backup``): the
    base model is still recognised then; a LoRA-like patch on the MODEL itself is another base."""
    import comfy.model_management as mm

    bridge = pack.nodes.bridge
    model, clip, vae = tiny
    mm.unload_all_models()
    before = bridge.native_fingerprint(model, clip, vae)
    patched = model.clone()
    key = next(iter(model.model.diffusion_model.state_dict()))
    patched.add_patches({"diffusion_model." + key: ("diff", (torch.ones_like(model.model.diffusion_model.state_dict()[key]),))})
    mm.load_models_gpu([patched], force_patch_weights=True)
    try:
        assert not torch.equal(model.model.diffusion_model.state_dict()[key], patched.backup["diffusion_model." + key].weight)
        assert bridge.native_fingerprint(model, clip, vae) == before
        assert bridge.native_fingerprint(patched, clip, vae)["unet"] != before["unet"]
    finally:
        mm.unload_all_models()
    assert bridge.native_fingerprint(model, clip, vae) == before


def test_the_unused_clip_projection_is_not_part_of_the_base(pack, tn, tiny, dirs, monkeypatch):
    """ComfyUI leaves SD 1.x CLIP's text_projection uninitialised (checkpoints lack it; SD 1.x / 2.x never use the
    pooled output): whatever its bytes after a restart, the base is the same; a run saved with the fingerprint of
    earlier versions (which hashed it) is found again by Train, and Load Run accepts its base."""
    bridge = pack.nodes.bridge
    model, clip, vae = tiny
    (name,) = [k for k in clip.cond_stage_model.state_dict() if k.endswith("text_projection.weight")]
    projection = clip.cond_stage_model.state_dict()[name]  # shares the weight's storage
    before, legacy = bridge.native_fingerprint(model, clip, vae), bridge.native_fingerprint(model, clip, vae, legacy=True)
    kept = projection.clone()
    try:
        projection.fill_(float("nan"))
        assert bridge.native_fingerprint(model, clip, vae) == before
        assert bridge.native_fingerprint(model, clip, vae, legacy=True)["clip"] != legacy["clip"]
    finally:
        projection.copy_(kept)

    current = bridge.native_fingerprint
    monkeypatch.setattr(bridge, "native_fingerprint", lambda *a, legacy=False: current(*a, legacy=True))  # an old version
    run = tn.DynASynTrain().train(**quick(tiny))["result"][4]
    monkeypatch.setattr(bridge, "native_fingerprint", current)
    monkeypatch.setattr(tn, "DynASynTrainer", lambda *a, **k: pytest.fail("the earlier version's run was trained again"))
    assert tn.DynASynTrain().train(**quick(tiny))["result"][4] == run
    assert tn.DynASynLoadRun().load(model, clip, run.label)["result"][3] == run


# ---------------------------------------------------------------------------------------------- memory (item 8)
def test_trained_model_holds_only_changed_tensors_in_the_base_dtype(pack, tiny, dirs):
    """Patches hold the base dtype (fp16 base: half the bytes of fp32 copies) and give the very weights the fp32
    "set" patches gave, rounded by ComfyUI's own patching: samples are unchanged."""
    import copy

    import comfy.model_management as mm

    bridge = pack.nodes.bridge
    for dtype in (torch.float32, torch.float16):
        mm.unload_all_models()  # no clone of the tiny model left patched in place by an earlier sampling
        base_model, base_clip, vae = tiny
        model, clip = base_model.clone(), base_clip.clone()
        if dtype == torch.float16:  # a half-precision base: a fresh copy of the tiny model's weights in fp16
            model = type(base_model)(copy.deepcopy(base_model.model).half(), base_model.load_device,
                                     base_model.offload_device)
        with torch.inference_mode(False):
            comps = bridge.native_to_components(model, clip, vae)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():  # "training": every UNet tensor but the first moves; the text encoder's last layer norm
                for i, p in enumerate(comps.unet.parameters()):
                    if i:
                        p.add_(torch.randn(p.shape, generator=g) * 1e-2)
                norm = next(k for k in comps.text_encoder.state_dict() if k.endswith("final_layer_norm.weight"))
                comps.text_encoder.get_parameter(norm).add_(0.1)
        unet, te = bridge.trained_weights(model, clip, comps)
        n_unet = len(list(comps.unet.parameters()))
        assert len(unet) == n_unet - 1 and set(te) == {norm}
        assert {t.dtype for t in unet.values()} == {dtype} and {t.dtype for t in te.values()} == {torch.float32}
        new_model, new_clip = bridge.apply_trained(model, clip, unet, te)
        assert {t.dtype for t in patch_tensors(new_model).values()} == {dtype}
        # the fp32 "set" patches of before, for comparison
        mapping = bridge.unet_key_map(model)
        old_model = model.clone()
        with torch.inference_mode(False):
            base_sd = model.model.diffusion_model.state_dict()
            old_model.add_patches({"diffusion_model." + mapping[k]: ("set", (v.detach().float().reshape(base_sd[mapping[k]].shape),))
                                   for k, v in comps.unet.state_dict().items()
                                   if "diffusion_model." + mapping[k] in {"diffusion_model." + mapping[d] for d in unet}})
        weights = []
        for m in (new_model, old_model):
            m.patch_model()
            weights.append({k: v.clone() for k, v in m.model.diffusion_model.state_dict().items()})
            m.unpatch_model()
        assert weights[0].keys() == weights[1].keys()
        assert [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])] == [], dtype
        if dtype == torch.float32:  # CPU sampling runs the fp32 model
            prompt = "a photo of a panda"
            assert torch.equal(sample_latent(new_model, new_clip, prompt), sample_latent(old_model, new_clip, prompt))
        fp32_bytes = sum(v.numel() * 4 for v in unet.values())
        assert sum(v.numel() * v.element_size() for v in patch_tensors(new_model).values()) == fp32_bytes * dtype.itemsize // 4


# ---------------------------------------------------------------------------------------------- Load Run
def test_load_run_reproduces_train_and_refuses_what_is_not_a_listed_run(pack, tn, tiny, dirs, embeddings_seen, tmp_path):
    model, clip, prompt, _, run, _, _ = tn.DynASynTrain().train(**quick(tiny))["result"]
    assert run.label in tn.DynASynLoadRun.INPUT_TYPES()["required"]["run"][0]
    (dirs / "embeddings" / "lost_panda.safetensors").unlink()  # deleted by the user: written again
    out = tn.DynASynLoadRun().load(tiny[0], tiny[1], run.label)["result"]
    assert (dirs / "embeddings" / "lost_panda.safetensors").is_file()
    assert same_patches(model, out[0]) and same_patches(clip, out[1])
    assert out[2] == prompt and out[3] == run and out[4] == "embedding:lost_panda, embedding:lost_bowl"
    assert out[5] == "panda, bowl"
    assert torch.equal(sample_latent(model, clip, prompt), sample_latent(out[0], out[1], out[2]))
    # the combo value is untrusted: only a listed run, never a path
    outside = tmp_path / "outside" / "0123456789abcdef"
    outside.mkdir(parents=True)
    (outside / "run.json").write_text("{}")
    os.symlink(outside.parent, runs_root(dirs) / "evil")  # a symlinked name is not listed
    for bad in ("../x", "/etc/passwd", "lost/../../../x", f"{run.label}/..", "evil/0123456789abcdef",
                run.label + "0", "lost", "", None, 3):
        with pytest.raises(RuntimeError, match="is not a finished run"):
            tn.DynASynLoadRun().load(tiny[0], tiny[1], bad)
    assert "evil/0123456789abcdef" not in _mod("dynasyn.runs").list_runs(runs_root(dirs))
    # another base model is refused, naming it
    other = tiny[0].clone()
    key = next(iter(other.model.diffusion_model.state_dict()))
    other.add_patches({"diffusion_model." + key: ("diff", (torch.full_like(other.model.diffusion_model.state_dict()[key], 1e-3),))})
    with pytest.raises(RuntimeError, match="trained from another MODEL"):
        tn.DynASynLoadRun().load(other, tiny[1], run.label)
    # an embedding file of that name that is not the run's is never overwritten
    from safetensors.torch import save_file
    (dirs / "embeddings" / "lost_bowl.safetensors").unlink()
    save_file({"emb_params": torch.zeros(1, 32)}, str(dirs / "embeddings" / "lost_bowl.safetensors"))
    with pytest.raises(RuntimeError, match="is not the embedding of run"):
        tn.DynASynLoadRun().load(tiny[0], tiny[1], run.label)


def test_a_damaged_run_gives_a_clear_error(pack, tn, tiny, dirs):
    run = tn.DynASynTrain().train(**quick(tiny))["result"][4]
    folder = runs_root(dirs) / run.label
    (folder / "unet.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RuntimeError, match="is damaged"):
        tn.DynASynLoadRun().load(tiny[0], tiny[1], run.label)
    (folder / "run.json").write_text('{"format": 1}')
    with pytest.raises(RuntimeError, match="not a DynASyn run of this version"):
        tn.DynASynLoadRun().load(tiny[0], tiny[1], run.label)


# ---------------------------------------------------------------------------------------------- Continue
def test_continue_training_adds_steps_and_is_itself_a_run(pack, tn, tiny, dirs, monkeypatch):
    runs = _mod("dynasyn.runs")
    parent = tn.DynASynTrain().train(**quick(tiny))["result"]
    model, clip, vae = tiny
    args = dict(model=model, clip=clip, vae=vae, run=parent[4].label, steps=3, save_as="embeddings", preview_every=0,
                sample_every=0, save_every=0)
    child = tn.DynASynContinueTraining().continue_training(**args)["result"]
    assert child[4].steps == 7 and len(child[6]["loss"]) == 7
    assert child[6]["loss"][:4] == parent[6]["loss"]
    assert child[2] == "a photo of embedding:lost_7_panda and embedding:lost_7_bowl"
    assert not same_patches(parent[0], child[0])
    record = runs.resolve_run(runs_root(dirs), child[4].label)
    assert record.meta["parent"]["key"] == runs.resolve_run(runs_root(dirs), parent[4].label).key
    assert record.meta["config"]["phase2_steps"] == 5
    assert not list(runs_root(dirs).glob("lost/continue_*"))  # its resumable state is gone
    # the same continuation again is loaded; forced, it trains to the very same weights
    with monkeypatch.context() as m:
        m.setattr(tn, "DynASynTrainer", lambda *a, **k: pytest.fail("trained again"))
        again = tn.DynASynContinueTraining().continue_training(**args)["result"]
    assert same_patches(child[0], again[0])
    forced = tn.DynASynContinueTraining().continue_training(**{**args, "force_retrain": True})["result"]
    assert same_patches(child[0], forced[0]) and same_patches(child[1], forced[1])
    with pytest.raises(RuntimeError, match="steps must be a whole number >= 1"):
        tn.DynASynContinueTraining().continue_training(**{**args, "steps": 0})
    with pytest.raises(RuntimeError, match="is not a finished run"):
        tn.DynASynContinueTraining().continue_training(**{**args, "run": "../lost"})


# ---------------------------------------------------------------------------------------------- watching
def test_sample_every_draws_the_scene_without_changing_the_weights(pack, tn, tiny, dirs, monkeypatch):
    import comfy.utils

    previews = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        previews.append((value, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    plain = tn.DynASynTrain().train(**quick(tiny))["result"]
    assert plain[5].shape == (1, 64, 64, 3) and not plain[5].any()  # sample_every 0: one black picture
    out = tn.DynASynTrain().train(**quick(tiny, sample_every=3, force_retrain=True, sample_prompt="[2] on [1]"))["result"]
    assert out[5].shape == (2, 64, 64, 3) and out[5].std() > 0  # step 3 and the last step
    assert [v for v, p in previews[-4:] if p is not None] == [3, 4]
    assert same_patches(plain[0], out[0]) and same_patches(plain[1], out[1])
    again = tn.DynASynTrain().train(**quick(tiny, sample_every=3))["result"]  # loaded: the stored samples
    assert torch.equal(again[5], out[5])


def test_save_every_writes_the_embeddings_at_that_step(pack, tn, tiny, dirs):
    tn.DynASynTrain().train(**quick(tiny, save_every=2))
    names = sorted(p.name for p in (dirs / "embeddings").iterdir())
    assert names == ["lost_bowl.safetensors", "lost_bowl_step2.safetensors", "lost_panda.safetensors",
                     "lost_panda_step2.safetensors"]
    assert not torch.equal(load_file(dirs / "embeddings" / "lost_panda_step2.safetensors")["emb_params"],
                           load_file(dirs / "embeddings" / "lost_panda.safetensors")["emb_params"])


def test_save_every_reaches_a_trainer_that_supports_it(pack, tn, tiny, dirs, monkeypatch):
    """Once TrainConfig has ``save_every`` (the trainer's versioned state), the widget reaches it; it is no part of
    the run's key (it changes how training saves, not what it trains)."""
    from dataclasses import dataclass

    @dataclass
    class WithSaveEvery(tn.TrainConfig):
        save_every: int = 0

    seen = []
    real = tn.DynASynTrainer
    monkeypatch.setattr(tn, "TrainConfig", WithSaveEvery)
    monkeypatch.setattr(tn, "DynASynTrainer", lambda c, i, m, n, cfg, **k: seen.append(cfg.save_every) or real(c, i, m, n, cfg, **k))
    tn.DynASynTrain().train(**quick(tiny, save_every=3))
    assert seen == [3]
    tn.DynASynTrain().train(**quick(tiny, save_every=0))
    assert seen == [3]  # loaded


def test_loss_map_plots_in_cores_loss_graph_node(pack, tn, tiny, dirs):
    from comfy_extras.nodes_train import LossGraphNode

    loss_map = tn.DynASynTrain().train(**quick(tiny))["result"][6]
    assert set(loss_map) == {"loss"} and len(loss_map["loss"]) == 4 and all(isinstance(v, float) for v in loss_map["loss"])
    LossGraphNode.execute(loss_map, "loss_graph")


# ---------------------------------------------------------------------------------------------- save_as
def test_the_checkpoint_is_written_before_the_embeddings_and_only_once(pack, tn, tiny, dirs, monkeypatch):
    order = []
    real_ckpt, real_emb = tn.bridge.save_checkpoint, tn.save_embedding
    monkeypatch.setattr(tn.bridge, "save_checkpoint", lambda *a, **k: order.append("checkpoint") or real_ckpt(*a, **k))
    monkeypatch.setattr(tn, "save_embedding", lambda *a, **k: order.append("embedding") or real_emb(*a, **k))
    tn.DynASynTrain().train(**quick(tiny, save_as="checkpoint"))
    assert order == ["checkpoint", "embedding", "embedding"]
    assert [p.name for p in (dirs / "checkpoints").iterdir()] == ["lost.safetensors"]
    tn.DynASynTrain().train(**quick(tiny, save_as="checkpoint", preview_every=2))  # loaded: nothing written again
    assert order == ["checkpoint", "embedding", "embedding"]


def test_save_as_lora_writes_a_lora_that_loraloader_turns_the_base_into_the_trained_model(pack, tn, tiny, dirs):
    import comfy.sd
    import comfy.utils

    model, clip = tiny[0], tiny[1]
    out = tn.DynASynTrain().train(**quick(tiny, save_as="lora", phase2_lr=1e-2))["result"]
    assert [p.name for p in (dirs / "loras").iterdir()] == ["lost.safetensors"]
    assert not list((dirs / "checkpoints").iterdir())
    lora = comfy.utils.load_torch_file(str(dirs / "loras" / "lost.safetensors"), safe_load=True)
    lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    prompt = "a photo of panda and bowl"  # the tuned UNet and text encoder, without the new tokens
    want, got, base = (sample_latent(m, c, prompt) for m, c in ((out[0], out[1]), (lora_model, lora_clip), (model, clip)))
    assert (got - want).abs().max() < 0.05 * (want - base).abs().max()


def test_a_full_disk_is_refused_before_writing_and_nothing_is_lost(pack, tn, tiny, dirs, monkeypatch):
    runs = _mod("dynasyn.runs")
    run = tn.DynASynTrain().train(**quick(tiny, save_as="embeddings"))["result"][4]
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(tn, "DynASynTrainer", lambda *a, **k: pytest.fail("trained again"))
    with monkeypatch.context() as m:
        m.setattr(runs.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9, 1000))
        with pytest.raises(RuntimeError, match="Not enough free disk space for the checkpoint.*nothing was lost"):
            tn.DynASynTrain().train(**quick(tiny, save_as="checkpoint"))
    assert not list((dirs / "checkpoints").iterdir())
    tn.DynASynTrain().train(**quick(tiny, save_as="checkpoint"))  # the run was kept: exported without training
    assert [p.name for p in (dirs / "checkpoints").iterdir()] == ["lost.safetensors"]
    assert runs.resolve_run(runs_root(dirs), run.label).meta["exports"] == {"checkpoint": "lost"}
    # a run that could not be stored is refused before training, not after
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9, 1000))
    with pytest.raises(RuntimeError, match="Not enough free disk space for the finished run"):
        tn.DynASynTrain().train(**quick(tiny, seed=5))  # the trainer (failing this test) is never made


# ---------------------------------------------------------------------------------------------- Scene Prompt
def test_scene_prompt_writes_the_scene_with_the_runs_words(pack, tn, tiny, dirs):
    run = tn.DynASynTrain().train(**quick(tiny))["result"][4]
    scene = tn.DynASynScenePrompt()
    assert scene.prompt(run, "[1]  hugging [2]\non a beach")["result"] == (
        "embedding:lost_panda hugging embedding:lost_bowl on a beach",)
    assert scene.prompt(run, " ")["result"] == ("a photo of embedding:lost_panda and embedding:lost_bowl",)
    for bad in ("[3] on a beach", "[0] and [1]", "a beach"):
        with pytest.raises(RuntimeError, match=r"must name the subjects as \[1\]…\[2\]"):
            scene.prompt(run, bad)
    with pytest.raises(RuntimeError, match="Connect the 'run' output"):
        scene.prompt("embedding:x", "[1]")


# ---------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("bad, message", [
    ({"save_as": "safetensors"}, "save_as must be one of checkpoint, lora, embeddings"),
    ({"save_as": "../x"}, "save_as must be one of"),
    ({"sample_every": -1}, "sample_every must be a whole number >= 0"),
    ({"save_every": "5"}, "save_every must be a whole number >= 0"),
    ({"preview_every": 1.5}, "preview_every must be a whole number"),
    ({"sample_prompt": "[3] on a beach"}, r"must name the subjects as \[1\]…\[2\]"),
    ({"sample_prompt": 5}, "The scene must be text"),
    ({"memory_preset": "64 GB"}, "memory_preset must be one of"),
    ({"run_name": "../x"}, "run name '../x' was refused"),
])
def test_each_new_input_refuses_bad_values_before_any_work(pack, tn, tiny, dirs, no_training, bad, message):
    with pytest.raises(RuntimeError, match=message):
        tn.DynASynTrain().train(**quick(tiny, **bad))
    assert not runs_root(dirs).exists() or not _mod("dynasyn.runs").list_runs(runs_root(dirs))
