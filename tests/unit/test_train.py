import pytest
import torch

from dynasyn.errors import DynASynError
from dynasyn.tiny import tiny_components
from dynasyn.train import MODES, Cancelled, DynASynTrainer, NonFiniteLoss, TrainConfig
from tests.support.scene import tensor_aug_pairs, tensor_scene as scene


def aug_pairs(n=2):
    return tensor_aug_pairs(n)


def cfg(**kw):
    base = dict(phase1_steps=2, phase2_steps=2, resolution=64, seed=0, num_class_images=2, class_image_steps=2)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_copy_is_the_truncated_model_in_its_dtype_with_tensors_of_its_own(dtype):
    """``frozen_copy`` equals deepcopy + truncate + ``.to(dtype)`` (what it replaces, without the full-size
    transient), shares no storage with the live UNet, and leaves the live UNet whole."""
    import copy

    from dynasyn.attention import capture_layers, last_layer
    from dynasyn.train import frozen_copy, truncate_after

    unet = tiny_components(seed=0).unet
    layer = last_layer(capture_layers(unet, 32))
    live = {k: v.clone() for k, v in unet.state_dict().items()}
    ref = copy.deepcopy(unet)
    truncate_after(ref, layer)
    ref = ref.to("cpu", dtype)
    got = frozen_copy(unet, "cpu", dtype, after=layer)
    assert got.state_dict().keys() == ref.state_dict().keys() and len(got.up_blocks) < len(unet.up_blocks)
    assert all(torch.equal(v, got.state_dict()[k]) and v.dtype == got.state_dict()[k].dtype
               for k, v in ref.state_dict().items())
    assert not got.training and not any(p.requires_grad for p in got.parameters())
    live_ptrs = {t.data_ptr() for t in list(unet.parameters()) + list(unet.buffers())}
    assert not live_ptrs & {t.data_ptr() for t in list(got.parameters()) + list(got.buffers())}
    assert unet.state_dict().keys() == live.keys() and all(torch.equal(v, live[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)  # training the live UNet leaves the copy as it was
    assert torch.equal(next(got.parameters()), next(ref.parameters()))


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
    expected = set(MODES[mode][0]) | ({"prior"} if MODES[mode].prior and 2 in MODES[mode].phases else set())
    assert set(result.history[-1].terms) == expected
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)


def test_thirty_steps_lower_attention_and_diffusion_losses():
    t = trainer(cfg(mode="break_a_scene", phase1_steps=0, phase2_steps=30, phase2_lr=1e-3, flip_p=0.0,
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

    from dynasyn.state import current_version
    saved = load_file(current_version(tmp_path / "state") / "text_encoder.safetensors")
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


def test_a_mask_that_vanishes_at_the_attention_maps_is_refused_by_name():
    """A subject under one 16x16 cell gives L_M2A / L_ICA an empty target: refused, naming the subject."""
    image = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(0))
    big, small = torch.zeros(128, 128), torch.zeros(128, 128)
    big[10:90, 10:90] = 1
    small[2:6, 2:7] = 1  # 20 pixels: passes the empty-mask check, but no 16x16 cell samples it
    with pytest.raises(DynASynError, match=r"Subject 2 \(bowl\) vanishes at the 16x16 attention maps"):
        DynASynTrainer(tiny_components(seed=0), image, [big, small], ["panda", "bowl"], cfg(mode="break_a_scene"),
                       device="cpu", log=lambda *_: None)


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_non_square_pictures_are_cropped_or_padded_with_their_masks_and_logged(aspect):
    image, masks, nouns = scene()
    wide = torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(1))
    wide[:, 16:80] = image
    wide_masks = [torch.nn.functional.pad(m, (16, 16)) for m in masks]
    msgs = []
    t = DynASynTrainer(tiny_components(seed=0), wide, wide_masks, nouns, cfg(mode="break_a_scene", aspect=aspect),
                       device="cpu", log=msgs.append)
    if aspect == "crop":  # the centre square is exactly the scene: masks cropped alike, not squashed
        assert torch.equal(t.ref_masks, torch.stack(masks))
        assert any("centre 64x64 square" in m and "96x64" in m for m in msgs)
    else:
        padded = torch.nn.functional.interpolate(torch.stack([torch.nn.functional.pad(m, (0, 0, 16, 16)) for m in wide_masks])[:, None],
                                                 size=(64, 64), mode="nearest")[:, 0]
        assert torch.equal(t.ref_masks, padded)
        assert any("padded to 96x96" in m for m in msgs)
    assert any("antialiased" in m for m in msgs)
    with pytest.raises(DynASynError, match="Unknown aspect"):
        cfg(aspect="squash")


def test_pictures_are_shrunk_with_antialiasing():
    from dynasyn.train import _resize

    checker = (torch.arange(192)[:, None] + torch.arange(192)[None]) % 2
    out = _resize(checker[None, None].float(), 64, "bilinear")
    assert (out - 0.5).abs().max() < 0.2  # plain bilinear at 3x samples single pixels: a 0/1 pattern


def test_prior_preservation_defaults_follow_break_a_scene_and_dreambooth():
    assert TrainConfig(mode="break_a_scene").use_prior and TrainConfig(mode="dreambooth").use_prior
    assert not TrainConfig(mode="dynasyn").use_prior and not TrainConfig(mode="textual_inversion").use_prior
    assert TrainConfig(mode="dynasyn", prior_preservation=True).use_prior
    assert not TrainConfig(mode="break_a_scene", prior_preservation=False).use_prior
    d = TrainConfig()
    assert (d.class_prompt, d.num_class_images, d.prior_loss_weight) == ("a photo at the beach", 100, 1.0)
    with pytest.raises(DynASynError, match="num_class_images"):
        TrainConfig(mode="dreambooth", num_class_images=0)


def test_prior_preservation_trains_on_base_model_class_images_cached_with_the_run(tmp_path, monkeypatch):
    import dynasyn.prior as prior
    from dynasyn.prior import generate_class_image

    config = cfg(mode="break_a_scene", phase1_steps=1, phase2_steps=3, num_class_images=3, class_prompt="a photo of a dog")
    # the class images come from the base model: drawn here on a fresh copy, before any training
    base = tiny_components(seed=0)
    from dynasyn.subjects import add_placeholder_tokens
    add_placeholder_tokens(base.tokenizer, base.text_encoder, ["<asset0>", "<asset1>"], ["panda", "bowl"])
    enc = lambda p: base.text_encoder(base.tokenizer(p, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        expected = [prior.quantize(generate_class_image(base, enc, "a photo of a dog", 64, 2, 7.5, 0 * 100003 + k, "cpu"))
                    for k in range(3)]
    msgs = []
    t = trainer(config, class_image_dir=tmp_path / "class_images")
    t.log = msgs.append
    t.train()
    assert all("prior" not in h.terms for h in t.history if h.phase == 1)  # no gradient there: not computed
    assert all(h.terms["prior"] > 0 for h in t.history if h.phase == 2)
    files = sorted(p.name for p in (tmp_path / "class_images").glob("*.png"))
    assert files == ["class_0000.png", "class_0001.png", "class_0002.png"]
    for k, e in enumerate(expected):
        torch.testing.assert_close(prior._read_png(tmp_path / "class_images" / files[k]), e, atol=1 / 255 + 1e-6, rtol=0)
    assert any("drawing 3 class images" in m for m in msgs)

    calls = []
    monkeypatch.setattr(prior, "generate_class_image", lambda *a, **k: calls.append(1))
    again = trainer(config, class_image_dir=tmp_path / "class_images")
    again.train()
    assert calls == []  # read from the run's cache
    assert [h.loss for h in again.history] == [h.loss for h in t.history]


def test_resuming_inside_phase_2_without_the_class_images_is_refused(tmp_path):
    config = cfg(mode="dreambooth", phase1_steps=0, phase2_steps=4)
    first = trainer(config, class_image_dir=tmp_path / "ci", should_stop=lambda: first.step == 2)
    with pytest.raises(Cancelled):
        first.train(state_dir=tmp_path / "state")
    for p in (tmp_path / "ci").glob("*.png"):
        p.unlink()
    resumed = trainer(config, class_image_dir=tmp_path / "ci")
    resumed.load_state(tmp_path / "state")
    with pytest.raises(DynASynError, match="can no longer come from the base model"):
        resumed.train()


def test_learning_rate_of_each_phase():
    t = trainer(cfg(mode="break_a_scene", phase1_steps=2, phase2_steps=2, phase1_lr=3e-3, phase2_lr=7e-5,
                    prior_preservation=False))
    seen = []
    real = t._setup_phase

    def setup(phase):
        real(phase)
        seen.append((phase, [g["lr"] for g in t.optimizer.param_groups]))

    t._setup_phase = setup
    t.train()
    assert seen == [(1, [3e-3]), (2, [7e-5])]
    assert [(h.phase, h.lr) for h in t.history] == [(1, 3e-3), (1, 3e-3), (2, 7e-5), (2, 7e-5)]


@pytest.mark.parametrize("precompute", [False, True])
def test_class_encodings_stay_at_the_base_model_through_training(precompute):
    """The precomputed class-prompt encodings are the base text encoder's and phase 2 never changes them; with the
    targets precomputed they are all used before the first step, then freed with the frozen copy."""
    from dynasyn.subjects import add_placeholder_tokens

    t = trainer(cfg(mode="dynasyn", phase1_steps=1, phase2_steps=3, phase2_lr=1e-3, frozen_dtype="fp32",
                    precompute_targets=precompute), augmented=aug_pairs(1))
    base = tiny_components(seed=0)
    add_placeholder_tokens(base.tokenizer, base.text_encoder, ["<asset0>", "<asset1>"], ["panda", "bowl"])
    with torch.no_grad():
        expected = {p: base.text_encoder(base.tokenizer(p, padding="max_length", max_length=77,
                                                        return_tensors="pt").input_ids)[0] for p in t.class_hidden}
    used, steps = {}, []
    real_class_maps = t._class_maps

    def class_maps(prompt, *a):
        used[prompt] = t.class_hidden[prompt].clone()
        steps.append(t.step)
        return real_class_maps(prompt, *a)

    t._class_maps = class_maps
    te_before = weights(t.c)
    t.train()
    assert any(not torch.equal(te_before[k], v) for k, v in weights(t.c).items() if k.startswith("te."))  # TE trained
    assert len(steps) == 8  # L_ICA and L_AUG at each of the 4 steps
    assert set(steps) == ({0} if precompute else {0, 1, 2, 3})
    assert set(used) <= set(expected) and len(expected) == 5
    for p, v in used.items():
        torch.testing.assert_close(v, expected[p], rtol=0, atol=1e-6, msg=p)
    assert t.frozen is None and t.class_hidden == {}


def test_reversed_subset_keeps_masks_placeholder_maps_and_class_maps_aligned(monkeypatch):
    """Subset [1, 0]: row 0 of every loss input is subject 1 (<asset1>, 'bowl', mask 1), row 1 is subject 0."""
    import dynasyn.train as train_mod

    t = trainer(cfg(mode="dynasyn_app", phase1_steps=1, phase2_steps=0, flip_p=0.0))
    monkeypatch.setattr(t, "_sample_subset", lambda rng: [1, 0])
    calls, losses = {}, {}
    real_maps = t._maps

    def maps(unet, te, store, prompt, noisy, tt, positions, **kw):
        out = real_maps(unet, te, store, prompt, noisy, tt, positions, **kw)
        calls["trained" if unet is t.c.unet else "frozen"] = (prompt, positions, out[0].detach().clone())
        return out

    monkeypatch.setattr(t, "_maps", maps)
    for name in ("masked_attention_loss", "inter_cross_attention_loss"):
        real = getattr(train_mod, name)
        monkeypatch.setattr(train_mod, name, lambda *a, _n=name, _r=real, **k: losses.setdefault(_n, a) and _r(*a, **k))
    t.train()
    tok = t.c.tokenizer
    (c_prompt, c_pos, c_maps), (hat_prompt, hat_pos, hat_maps) = calls["trained"], calls["frozen"]
    assert (c_prompt, hat_prompt) == ("a photo of <asset1> and <asset0>", "a photo of bowl and panda")
    ids = tok(c_prompt).input_ids
    assert c_pos == [[ids.index(t.token_ids[1])], [ids.index(t.token_ids[0])]]
    hat_ids = tok(hat_prompt).input_ids
    assert [hat_ids[p[0]] for p in hat_pos] == [tok("bowl", add_special_tokens=False).input_ids[0],
                                                 tok("panda", add_special_tokens=False).input_ids[0]]
    maps_m2a, masks_m2a = losses["masked_attention_loss"]
    maps_ica, class_ica, masks_ica = losses["inter_cross_attention_loss"]
    for masks in (masks_m2a, masks_ica):
        assert torch.equal(masks[0], t.ref_masks[1]) and torch.equal(masks[1], t.ref_masks[0])
    torch.testing.assert_close(maps_m2a.detach(), c_maps)
    torch.testing.assert_close(maps_ica.detach(), c_maps)
    torch.testing.assert_close(class_ica, hat_maps.float())
