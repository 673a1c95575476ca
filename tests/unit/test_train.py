import pytest
import torch

from dynasyn.dataset import AugmentedPair
from dynasyn.errors import DynASynError
from dynasyn.tiny import tiny_components
from dynasyn.train import MODES, Cancelled, DynASynTrainer, NonFiniteLoss, TrainConfig
from tests.support.scene import tensor_scene as scene


def aug_pairs(n=2):
    out = []
    for k in range(n):
        img, masks, _ = scene(seed=10 + k)
        out.append(AugmentedPair(img, "a panda jumping into a bowl", [0, 1], torch.stack(masks)))
    return out


def cfg(**kw):
    base = dict(phase1_steps=2, phase2_steps=2, resolution=64, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def trainer(config, augmented=(), **kw):
    image, masks, nouns = scene()
    return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, augmented=augmented, device="cpu",
                          log=lambda *_: None, **kw)


def weights(comps):
    return {**{"unet." + k: v.clone() for k, v in comps.unet.state_dict().items()},
            **{"te." + k: v.clone() for k, v in comps.text_encoder.state_dict().items()}}


def test_phase1_changes_only_placeholder_rows():
    t = trainer(cfg(mode="break_a_scene", phase1_steps=3, phase2_steps=0))
    before = weights(t.c)
    t.train()
    after = weights(t.c)
    emb_key = next(k for k in after if k.endswith("token_embedding.weight"))
    for k in before:
        if k != emb_key:
            assert torch.equal(before[k], after[k]), k
    changed = (before[emb_key] != after[emb_key]).any(dim=1).nonzero().flatten().tolist()
    assert changed == t.token_ids


def test_phase2_trains_unet_and_text_encoder_but_never_the_frozen_model():
    t = trainer(cfg(mode="dynasyn", phase1_steps=1, phase2_steps=2, phase2_lr=1e-3, frozen_dtype="bf16"),
                augmented=aug_pairs())
    frozen_unet, frozen_te, _ = t.frozen
    assert frozen_te is None  # few class prompts: their base encodings are precomputed instead
    class_hidden = {k: v.clone() for k, v in t.class_hidden.items()}
    assert len(class_hidden) == 5 and "a photo of bowl and panda" in class_hidden  # 4 ordered subsets + aug prompt
    frozen_before = {k: v.clone() for k, v in frozen_unet.state_dict().items()}
    assert frozen_unet.dtype == torch.bfloat16  # half precision
    before = weights(t.c)
    t.train()
    after = weights(t.c)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("te.") and "token_embedding" not in k)
    assert all(torch.equal(frozen_before[k], v) for k, v in frozen_unet.state_dict().items())
    assert all(p.grad is None for p in frozen_unet.parameters())
    assert all(set(h.terms) == {"md", "m2a", "ica", "aug"} for h in t.history)


def test_frozen_model_trimmed_and_precomputed_gives_the_full_models_class_maps():
    """Dropping the frozen UNet's unused up blocks and precomputing class encodings changes no map."""
    import copy

    from dynasyn.attention import AttentionStore, install_attention_capture

    t = trainer(cfg(mode="dynasyn", frozen_dtype="fp32"))
    full_unet = copy.deepcopy(t.c.unet).requires_grad_(False)
    full_te = copy.deepcopy(t.c.text_encoder).requires_grad_(False)
    store = AttentionStore()
    install_attention_capture(full_unet, store, t.capture)
    assert sum(p.numel() for p in t.frozen[0].parameters()) < sum(p.numel() for p in full_unet.parameters())
    for subset in ([0], [1, 0], [0, 1]):
        pair = __import__("dynasyn.subjects", fromlist=["x"]).make_prompt_pair(t.c.tokenizer, t.subjects, subset,
                                                                              t.cfg.template)
        noisy = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(len(subset)))
        tt = torch.tensor([500])
        ours = t._class_maps(pair.class_prompt, noisy, tt, pair.class_positions)
        ref = t._maps(full_unet, full_te, store, pair.class_prompt, noisy, tt, pair.class_positions, grad=False,
                      need_pred=False)[0].float()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_augmentation_loss_has_no_reconstruction_term(monkeypatch):
    """L_AUG must not call the masked diffusion loss on augmented images."""
    import dynasyn.train as train_mod

    calls = []
    real = train_mod.masked_diffusion_loss
    monkeypatch.setattr(train_mod, "masked_diffusion_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = trainer(cfg(mode="dynasyn_act", phase1_steps=2, phase2_steps=0), augmented=aug_pairs())
    t.train()
    assert len(calls) == 2  # one per step, for the reference image only
    assert all("aug" in h.terms for h in t.history)


def test_no_augmented_pairs_trains_without_l_aug_and_says_so():
    msgs = []
    image, masks, nouns = scene()
    t = DynASynTrainer(tiny_components(seed=0), image, masks, nouns, cfg(mode="dynasyn"), device="cpu", log=msgs.append)
    assert any("without L_AUG" in m for m in msgs)
    t.train()
    assert all("aug" not in h.terms for h in t.history)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_runs(mode):
    t = trainer(cfg(mode=mode, phase1_steps=1, phase2_steps=1), augmented=aug_pairs(1))
    result = t.train()
    assert len(result.history) == 2
    expected = set(MODES[mode][0])
    assert set(result.history[-1].terms) == expected
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)


def test_thirty_steps_lower_attention_and_diffusion_losses():
    t = trainer(cfg(mode="break_a_scene", phase1_steps=0, phase2_steps=40, phase2_lr=1e-3, flip_p=0.0,
                    lambda_m2a=1.0))
    t.train()
    md = [h.terms["md"] for h in t.history]
    m2a = [h.terms["m2a"] for h in t.history]
    assert sum(m2a[-10:]) < sum(m2a[:10])
    assert sum(md[-10:]) < sum(md[:10])


def test_same_seed_same_weights_and_cancel_resume_matches(tmp_path):
    config = cfg(mode="dynasyn", phase1_steps=3, phase2_steps=3, phase2_lr=1e-4)
    full = trainer(config, augmented=aug_pairs())
    full.train()
    again = trainer(config, augmented=aug_pairs())
    again.train()
    w_full, w_again = weights(full.c), weights(again.c)
    assert all(torch.equal(w_full[k], w_again[k]) for k in w_full)

    stop_at = {"n": 4}
    first = trainer(config, augmented=aug_pairs(), should_stop=lambda: len(first.history) >= stop_at["n"])
    with pytest.raises(Cancelled) as e:
        first.train(state_dir=tmp_path / "state")
    assert e.value.step == 4 and (tmp_path / "state" / "state.json").exists()
    resumed = trainer(config, augmented=aug_pairs())
    resumed.load_state(tmp_path / "state")
    resumed.train()
    w_res = weights(resumed.c)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full), [k for k in w_full if not torch.equal(w_full[k], w_res[k])][:3]
    assert [h.loss for h in resumed.history] == [h.loss for h in full.history]


def test_nan_loss_stops_with_a_clear_error():
    t = trainer(cfg(mode="break_a_scene", phase1_steps=2, phase2_steps=0))
    with torch.no_grad():
        t.c.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="Lower the learning rate"):
        t.train()


def test_nan_loss_keeps_and_saves_the_last_good_state(tmp_path):
    t = trainer(cfg(mode="break_a_scene", phase1_steps=3, phase2_steps=0))
    real_step = t.training_step

    def step_then_poison():
        if t.step == 2:
            with torch.no_grad():
                t.c.unet.conv_out.bias.fill_(float("nan"))
        return real_step()

    t.training_step = step_then_poison
    with pytest.raises(NonFiniteLoss, match="Resumable state of step 2"):
        t.train(state_dir=tmp_path / "state")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "state" / "text_encoder.safetensors")
    key = next(k for k in saved if k.endswith("token_embedding.weight"))
    assert torch.isfinite(saved[key]).all()


def test_out_of_memory_names_the_memory_options():
    t = trainer(cfg(mode="break_a_scene", phase1_steps=2, phase2_steps=0))

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t.training_step = oom
    with pytest.raises(DynASynError, match="gradient_checkpointing.*adamw8bit or adafactor"):
        t.train()


def test_bad_config_is_refused():
    with pytest.raises(DynASynError, match="Unknown mode"):
        TrainConfig(mode="lora")
    with pytest.raises(DynASynError, match="multiple of 64"):
        TrainConfig(resolution=500)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_backward_step_equals_the_usual_step_without_clipping(optimizer, tmp_path):
    """The step fused into backward is the same update, one tensor at a time; no gradient is kept."""
    results = []
    for fused in (False, True):
        t = trainer(cfg(mode="dynasyn", optimizer=optimizer, max_grad_norm=0.0, fused_backward_step=fused,
                        phase2_lr=1e-4), augmented=aug_pairs(1))
        t.train(state_dir=tmp_path / f"s{fused}")
        assert all(p.grad is None for p in t.c.unet.parameters())
        results.append(weights(t.c))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_fused_backward_step_cancel_and_resume_matches(tmp_path):
    def run(stop_at=None, resume=False):
        t = trainer(cfg(mode="break_a_scene", fused_backward_step=True, optimizer="adafactor", phase2_lr=1e-4),
                    should_stop=(lambda: t.step == stop_at) if stop_at else None)
        if resume:
            t.load_state(tmp_path / "state")
        try:
            t.train(state_dir=tmp_path / "state")
        except Cancelled:
            return None
        return weights(t.c)

    full = run()
    assert run(stop_at=3) is None
    resumed = run(resume=True)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# The paper's Table 3 (ablation) rows, written out from the paper: "MD" is the "Masked Diffusion" section's base
# (L_MD and L_M2A), "App" adds L_ICA (Fig. 2 (a)), "Act" adds L_AUG (Fig. 2 (b), (c)); the last row is Eq. 5, whose
# numbers equal Table 1's DynASyn means.
PAPER_TABLE_3 = {
    ("MD",): {"md", "m2a"},
    ("MD", "App"): {"md", "m2a", "ica"},
    ("MD", "Act"): {"md", "m2a", "aug"},
    ("MD", "App", "Act"): {"md", "m2a", "ica", "aug"},
}
PAPER_EQ5 = {"md", "m2a", "ica", "aug"}


def test_modes_reproduce_table_3_and_eq_5():
    from dynasyn.train import describe_mode

    rows = {("MD",): "dynasyn_md", ("MD", "App"): "dynasyn_app", ("MD", "Act"): "dynasyn_act",
            ("MD", "App", "Act"): "dynasyn"}
    for row, mode in rows.items():
        assert set(TrainConfig(mode=mode).losses) == PAPER_TABLE_3[row], mode
        assert TrainConfig(mode=mode).phases == (1, 2) and TrainConfig(mode=mode).subsets == "union"
        assert not TrainConfig(mode=mode).use_prior  # DynASyn's prior is L_ICA / L_AUG
    assert set(TrainConfig(mode="dynasyn").losses) == PAPER_EQ5
    assert "dynasyn_app_act" not in MODES  # the full row is dynasyn itself, not a second name for it
    assert "L_MD + L_M2A + L_ICA + L_AUG" in describe_mode("dynasyn")


@pytest.mark.parametrize("mode", ["textual_inversion", "dreambooth"])
def test_ti_and_db_show_one_subject_per_step(mode):
    """TI (+mask) and DB (+mask): "a photo of <asset_i>" and mask M_i, every step, each subject in turn at random."""
    import dynasyn.train as train_mod

    t = trainer(cfg(mode=mode, phase1_steps=10, phase2_steps=10, prior_preservation=False))
    seen = []
    real = train_mod.masked_diffusion_loss

    def spy(pred, target, mask):
        seen.append(mask.clone())
        return real(pred, target, mask)

    train_mod.masked_diffusion_loss = spy
    try:
        t.train()
    finally:
        train_mod.masked_diffusion_loss = real
    assert all(len(h.subjects) == 1 for h in t.history)
    assert {h.subjects[0] for h in t.history} == {"<asset0>", "<asset1>"}
    for h, m in zip(t.history, seen):
        i = int(h.subjects[0][-2])
        assert torch.equal(m, t.ref_masks[i]) or torch.equal(m, t.ref_masks[i].flip(-1))


def test_union_sampling_size_is_uniform_over_1_to_n():
    import random
    from collections import Counter

    from dynasyn.losses import union_sample

    rng = random.Random(0)
    sizes = Counter(len(union_sample(4, rng)) for _ in range(8000))
    assert set(sizes) == {1, 2, 3, 4}
    assert all(abs(sizes[k] / 8000 - 0.25) < 0.03 for k in sizes)  # k ~ U{1..N}, not U over subsets (1/15, 4/15, ...)
