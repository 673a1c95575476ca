"""Nothing lost on Cancel or failure, nothing kept alive after: the Train / Augment / GSA nodes in-process.

Real ComfyUI 0.3.75 modules (its progress bar, interrupt flag, model classes), the tiny random model made
native by the bridge, every folder ComfyUI would write to redirected under ``tmp_path``.
"""

import gc
import importlib
import json
import types
import weakref

import pytest
import torch

from tests.support.scene import tensor_scene


def _mod(name):
    return importlib.import_module(f"dynasyn_pack.{name}")


@pytest.fixture(scope="module")
def tiny(tiny_native):
    return tiny_native[1:]  # MODEL, CLIP, VAE


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """ComfyUI's output / user / temp / embeddings / checkpoints folders under tmp_path; no interrupt pending."""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    for name in ("output", "user", "temp", "embeddings", "checkpoints", "loras"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path / "user"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    for name in ("embeddings", "checkpoints", "loras"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(tmp_path / name)], folder_paths.folder_names_and_paths[name][1]))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    mm.interrupt_current_processing(False)
    yield tmp_path
    mm.interrupt_current_processing(False)


def comfy_progress_hook(interrupt_at=None):
    """ComfyUI's own progress hook as main.py installs it: it raises (and clears) a pending interrupt.

    ``interrupt_at``: the step at which a Cancel arrives while the node is busy between its own
    interrupt check and the hook (e.g. rendering the loss-curve preview)."""
    import comfy.model_management as mm

    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        if value == interrupt_at:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    hook.seen = seen
    return hook


def train_inputs(tiny, **kw):
    model, clip, vae = tiny
    image, masks, nouns = tensor_scene()
    args = dict(model=model, clip=clip, vae=vae, image=image[None], masks=torch.stack(masks), class_nouns=", ".join(nouns),
                mode="dynasyn", phase1_steps=3, phase2_steps=3, phase1_lr=5e-3, phase2_lr=1e-4, lambda_md=1.0,
                lambda_m2a=0.01, lambda_ica=0.01, lambda_aug=0.01, seed=0, resolution=64, gradient_checkpointing=False,
                mixed_precision="no", optimizer="adamw", fused_backward_step=False, frozen_dtype="fp32",
                train_text_encoder=True, run_name="lost", save_as="embeddings", resume=True, preview_every=1)
    args.update(kw)
    return args


def saved_state(root):
    states = sorted(root.rglob("state.json"))
    return json.loads(states[0].read_text()) if states else None


# ---------------------------------------------------------------------------------------------- item 7
def test_cancel_through_the_progress_hook_saves_state_and_raises_comfys_interrupt(pack, tiny, dirs, monkeypatch):
    """ComfyUI's progress hook raises InterruptProcessingException inside pbar.update_absolute: that is a
    Cancel (resumable state saved, ComfyUI's own exception re-raised), not a generic node error."""
    import comfy.model_management as mm
    import comfy.utils

    hook = comfy_progress_hook(interrupt_at=2)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    node = pack.nodes.train_node.DynASynTrain()
    with pytest.raises(mm.InterruptProcessingException):
        node.train(**train_inputs(tiny))
    state = saved_state(dirs)
    assert state is not None and state["step"] == 2  # stopped before step 3, the state of step 2 kept
    assert not mm.processing_interrupted()  # the flag is spent, as ComfyUI's own check leaves it
    assert not list((dirs / "embeddings").iterdir())  # nothing exported from an unfinished run

    # queued again with resume on, it continues from step 2 and finishes
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", comfy_progress_hook())
    out = node.train(**train_inputs(tiny))
    assert "embedding:lost_panda" in out["result"][2]
    assert saved_state(dirs) is None  # finished: the state is gone


@pytest.mark.parametrize("where, step", [("dynasyn.train", 4), ("dynasyn.targets", 0)])
def test_an_interrupt_raised_anywhere_in_the_loop_is_a_cancel(pack, tiny, dirs, monkeypatch, where, step):
    """Raised by the node's own event after step 4, or while the frozen-model targets are made (before step 1)."""
    import comfy.model_management as mm

    train_node = pack.nodes.train_node

    def send(event, data):
        if event == where == "dynasyn.train" and data["step"] == 4 or event == where == "dynasyn.targets":
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(train_node, "_send", send)
    with pytest.raises(mm.InterruptProcessingException):
        train_node.DynASynTrain().train(**train_inputs(tiny))
    assert saved_state(dirs)["step"] == step


# ---------------------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("cancel", [False, True], ids=["finished", "cancelled"])
def test_nothing_of_the_trainer_outlives_the_node(pack, tiny, dirs, monkeypatch, cancel):
    """No reference cycle keeps the trainer (and its modules) until the next garbage collection."""
    import comfy.model_management as mm
    import comfy.utils

    train_node = pack.nodes.train_node
    made = []

    class Tracked(train_node.DynASynTrainer):
        def __init__(self, comps, *a, **kw):
            super().__init__(comps, *a, **kw)
            made.extend([weakref.ref(self), weakref.ref(comps.unet), weakref.ref(comps.text_encoder)])

    monkeypatch.setattr(train_node, "DynASynTrainer", Tracked)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", comfy_progress_hook(interrupt_at=2 if cancel else None))
    gc.collect()
    gc.disable()
    try:
        try:
            out = train_node.DynASynTrain().train(**train_inputs(tiny, phase1_steps=2, phase2_steps=2))
        except mm.InterruptProcessingException:
            assert cancel
        else:
            assert not cancel
            del out
        alive = [r() for r in made if r() is not None]
        assert not alive, f"still alive without gc.collect(): {[type(a).__name__ for a in alive]}"
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------- item 12
def test_train_parses_nouns_and_checks_the_image_like_every_other_node(pack, tiny, dirs):
    train = pack.nodes.train_node.DynASynTrain()
    out = train.train(**train_inputs(tiny, class_nouns=" panda, bowl, ", phase1_steps=1, phase2_steps=0,
                                     mode="textual_inversion"))
    assert out["result"][2] == "a photo of embedding:lost_panda and embedding:lost_bowl"
    image = train_inputs(tiny)["image"]
    with pytest.raises(RuntimeError, match="ONE image, not a batch of 2"):
        train.train(**train_inputs(tiny, image=torch.cat([image, image])))
    with pytest.raises(RuntimeError, match="2 masks for 3 class nouns"):
        train.train(**train_inputs(tiny, class_nouns="panda, bowl, cup"))
    with pytest.raises(RuntimeError, match="class noun of each subject"):
        train.train(**train_inputs(tiny, class_nouns=" , "))


def test_out_of_memory_reaches_comfyui_as_its_oom_exception(pack, tiny, dirs, monkeypatch):
    """ComfyUI's executor handles OOM itself (unloads every model, shows its tips) only for its OOM type."""
    import comfy.model_management as mm

    train_node = pack.nodes.train_node
    OutOfMemory = pack.dynasyn.train.OutOfMemory

    def oom(self, state_dir=None):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as e:
            raise OutOfMemory("Out of memory at step 1 (cuda): turn on gradient_checkpointing") from e

    monkeypatch.setattr(train_node.DynASynTrainer, "train", oom)
    with pytest.raises(mm.OOM_EXCEPTION, match="DynASyn: Out of memory at step 1.*gradient_checkpointing"):
        train_node.DynASynTrain().train(**train_inputs(tiny))

    user_error = pack.nodes.common.user_error
    assert isinstance(user_error(torch.OutOfMemoryError("CUDA out of memory")), mm.OOM_EXCEPTION)
    assert not isinstance(user_error(ValueError("x")), mm.OOM_EXCEPTION)


# ---------------------------------------------------------------------------------------------- item 9
def augment_inputs(pack, tiny, **kw):
    model, clip, vae = tiny
    image, masks, nouns = tensor_scene()
    prompts = pack.nodes.augment_nodes.DynASynAugmentPrompts().prompts(
        "panda\nbowl", "panda, bowl", 3, "offline", "m", "http://127.0.0.1:9/v1", 10.0, 0)["result"][0]
    args = dict(model=model, clip=clip, vae=vae, image=image[None], masks=torch.stack(masks), prompts=prompts, size=64,
                draft_steps=1, inpaint_steps=1, gsa_strength=0.7, gsa_steps=10, gsa_sampler="ddim", paper_exact=False,
                guidance=5.0, seed=0)
    args.update(kw)
    return args


def failing_augment(pack, error, monkeypatch, pairs=2):
    """The augmentation stage finishes ``pairs`` pairs, then fails with ``error``."""
    AugmentedPair = _mod("dynasyn.dataset").AugmentedPair

    def augment(renderer, ref, masks, nouns, descriptions, templates, cfg, *, on_pair, **kw):
        for k in range(pairs):
            on_pair(AugmentedPair(torch.rand(64, 64, 3), "a panda next to a bowl", [0, 1], torch.stack(masks)))
        raise error

    monkeypatch.setattr(_mod("dynasyn.augment"), "augment", augment)


@pytest.mark.parametrize("error, kind", [(ValueError("the sampler broke"), RuntimeError),
                                         (torch.OutOfMemoryError("CUDA out of memory"), torch.OutOfMemoryError)])
def test_augment_keeps_the_finished_pairs_on_any_failure_and_says_where(pack, tiny, dirs, monkeypatch, error, kind):
    failing_augment(pack, error, monkeypatch)
    with pytest.raises(kind) as e:
        pack.nodes.augment_nodes.DynASynAugment().augment(**augment_inputs(pack, tiny))
    kept = dirs / "user" / "__dynasyn" / "datasets" / "failed"
    assert f"The 2 augmented pairs finished before this are kept in {kept}" in str(e.value)
    assert str(error) in str(e.value)
    assert len(_mod("dynasyn.dataset").load_dataset(kept)) == 2


def test_augment_keeps_the_finished_pairs_on_cancel(pack, tiny, dirs, monkeypatch):
    import comfy.model_management as mm

    failing_augment(pack, mm.InterruptProcessingException(), monkeypatch, pairs=1)
    with pytest.raises(mm.InterruptProcessingException):
        pack.nodes.augment_nodes.DynASynAugment().augment(**augment_inputs(pack, tiny))
    assert len(_mod("dynasyn.dataset").load_dataset(dirs / "user" / "__dynasyn" / "datasets" / "cancelled")) == 1


def test_augment_failure_with_nothing_made_is_the_plain_error(pack, tiny, dirs, monkeypatch):
    failing_augment(pack, ValueError("the sampler broke"), monkeypatch, pairs=0)
    with pytest.raises(RuntimeError, match="ValueError: the sampler broke$"):
        pack.nodes.augment_nodes.DynASynAugment().augment(**augment_inputs(pack, tiny))
    assert not (dirs / "user" / "__dynasyn" / "datasets").exists()


# ---------------------------------------------------------------------------------------------- item 11
@pytest.mark.parametrize("family", ["SDXL", "Flux", "SD15_instructpix2pix", "SD21UnclipH", "inpaint"])
def test_augment_and_gsa_check_the_model_family_first(pack, tiny, dirs, monkeypatch, family):
    """The error Train gives, before any sampling (the renderer / sampler are never reached)."""
    import comfy.supported_models as sm

    unet_config = {"in_channels": 4, "model_channels": 320, "context_dim": 2048, "use_linear_in_transformer": True,
                   "adm_in_channels": 2816, "use_temporal_attention": False, "transformer_depth": [0, 0, 2, 2, 10, 10]}
    if family == "inpaint":  # an SD 1.5 inpainting checkpoint: SD15 class, 9 input channels
        config = sm.SD15({**unet_config, "in_channels": 9})
    else:
        config = getattr(sm, family)(dict(unet_config))
    wrong = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))

    def never(*a, **kw):
        raise AssertionError("sampling started on an unsupported model")

    monkeypatch.setattr(pack.nodes.comfy_render, "ComfyRenderer", never)
    monkeypatch.setattr(pack.nodes.gsa_node, "comfy_gsa", never)
    with pytest.raises(RuntimeError, match="SD 1.5 or SD 2.1|input channels") as augment_error:
        pack.nodes.augment_nodes.DynASynAugment().augment(**augment_inputs(pack, tiny, model=wrong))
    _, clip, vae = tiny
    with pytest.raises(RuntimeError, match="SD 1.5 or SD 2.1|input channels") as gsa_error:
        pack.nodes.gsa_node.DynASynGSA().gsa(wrong, [], [], vae, torch.rand(1, 64, 64, 3), 0.7, 10, "ddim", 5.0, 0, False)
    with pytest.raises(RuntimeError) as train_error:
        pack.nodes.train_node.DynASynTrain().train(**train_inputs(tiny, model=wrong))
    assert str(augment_error.value) == str(gsa_error.value) == str(train_error.value)


def test_cancel_during_an_llm_call_ends_the_prompt_as_comfys_interrupt(pack, dirs, monkeypatch):
    import comfy.model_management as mm

    from tests.support.openai_server import FakeOpenAI

    monkeypatch.setattr(_mod("dynasyn.llm"), "resolve_api_key", lambda *a, **kw: "k")
    image, masks, _ = tensor_scene()
    with FakeOpenAI() as server:
        server.replies = [{"status": 429, "message": "slow down"}] * 5
        mm.interrupt_current_processing(True)  # Cancel pressed while the node waits for the model
        with pytest.raises(mm.InterruptProcessingException):
            pack.nodes.augment_nodes.DynASynDescribeSubjects().describe(
                image[None], torch.stack(masks), "panda, bowl", "vlm", "llava", server.base_url, 30.0, 0)
        with pytest.raises(mm.InterruptProcessingException):
            mm.interrupt_current_processing(True)
            pack.nodes.augment_nodes.DynASynAugmentPrompts().prompts(
                "red panda\nblue bowl", "panda, bowl", 3, "llm", "llama", server.base_url, 30.0, 0)
        assert server.requests == []
    assert not mm.processing_interrupted()
