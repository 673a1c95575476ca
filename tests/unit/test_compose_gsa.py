import pytest
import torch

from dynasyn.compose import dilate, paste_subjects
from dynasyn.dataset import AugmentedPair, load_dataset, save_dataset
from dynasyn.errors import DynASynError
from dynasyn.gsa import GSAConfig, guided_sde_augment, make_scheduler, masked_inpaint, start_timesteps
from dynasyn.tiny import tiny_components


def box(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1
    return m


def reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(40, 40, 3, generator=g)
    m = box(40, 40, 5, 15, 10, 30)       # 10 x 20 subject
    m[5:8, 10:14] = 0                     # not a rectangle: the mask decides what is pasted
    return ref, m


def test_pasted_pixels_equal_source_and_inpaint_is_the_uncovered_region_dilated():
    ref, m = reference()
    draft = torch.zeros(64, 64, 3)
    pseudo = box(64, 64, 20, 40, 12, 32)  # 20 x 20 box: the 10 x 20 paste fits at scale 1, centred vertically
    out = paste_subjects(draft, pseudo[None], ref, [m], dilation=2)
    placed = out.masks[0] > 0
    assert int(placed.sum()) == int(m.sum())
    ys, xs = torch.nonzero(m > 0, as_tuple=True)
    # centred: rows 25..35, cols 12..32 hold the source pixels exactly
    assert torch.equal(out.image[ys + 20, xs + 2], ref[ys, xs])
    assert torch.equal(out.image[~placed], draft[~placed])
    uncovered = (pseudo > 0) & ~placed
    expected = dilate(uncovered.float(), 2) * (~placed).float()
    assert torch.equal(out.inpaint_mask, expected)
    assert not (out.inpaint_mask.bool() & placed).any()
    assert out.skipped == []


def test_scaled_paste_keeps_aspect_and_handles_borders_and_tiny_masks():
    ref, m = reference()
    draft = torch.full((64, 64, 3), 0.5)
    at_border = box(64, 64, 0, 64, 54, 64)   # 64 x 10 column at the right edge: paste 5 x 10
    tiny = box(64, 64, 30, 32, 30, 32)       # 4 pixels: skipped and reported
    out = paste_subjects(draft, torch.stack([at_border, tiny]), torch.cat([ref]), [m, m], min_pixels=16)
    y0, y1 = torch.nonzero(out.masks[0].any(1)).flatten()[[0, -1]].tolist()
    x0, x1 = torch.nonzero(out.masks[0].any(0)).flatten()[[0, -1]].tolist()
    assert x1 <= 63 and x0 >= 54 and (y1 - y0 + 1) <= 5
    assert out.skipped == [1] and out.masks[1].sum() == 0


def test_compose_bad_input():
    ref, m = reference()
    with pytest.raises(DynASynError, match="one per subject"):
        paste_subjects(torch.zeros(8, 8, 3), torch.zeros(2, 8, 8), ref, [m])
    with pytest.raises(DynASynError, match="RGB"):
        paste_subjects(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 8), ref, [m])


def test_start_timestep_is_700_for_default_and_paper_exact():
    for sampler in ("ddim", "ddpm", "euler"):
        ts = start_timesteps(make_scheduler(GSAConfig(sampler=sampler), "epsilon"), 30, 0.7)
        assert int(ts[0]) == 699 and len(ts) == 21
    ts = start_timesteps(make_scheduler(GSAConfig(paper_exact=True), "epsilon"), 1000, 0.7)
    assert int(ts[0]) == 699 and len(ts) == 700


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_gsa_matches_diffusers_img2img_pipeline(sampler):
    """The peer check: same strength, seed and scheduler as StableDiffusionImg2ImgPipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    comps = tiny_components(seed=3)
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    cfg = GSAConfig(strength=0.7, steps=10, sampler=sampler, guidance_scale=5.0, seed=11)
    ours, info = guided_sde_augment(comps, image, "a panda jumping into a bowl", cfg)
    pipe = StableDiffusionImg2ImgPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                          unet=comps.unet, scheduler=make_scheduler(cfg, "epsilon"), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a panda jumping into a bowl", image=image.permute(2, 0, 1)[None], strength=0.7, num_inference_steps=10,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(11), output_type="pt").images[0]
    torch.testing.assert_close(ours, ref.permute(1, 2, 0).float(), atol=1e-5, rtol=1e-5)
    assert info == {"start_timestep": 699, "unet_evaluations": 7}


def test_masked_inpaint_keeps_the_known_region():
    comps = tiny_components(seed=3)
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2))
    mask = box(64, 64, 16, 48, 16, 48)
    out, info = masked_inpaint(comps, image, mask, "a panda", GSAConfig(strength=1.0, steps=4, seed=0))
    assert info["start_timestep"] == 999
    outside = mask == 0
    assert torch.equal(out[outside], image[outside])  # known pixels kept exactly
    assert (out[mask > 0] - image[mask > 0]).abs().mean() > 1e-2  # the hole is generated


def test_dataset_folder_round_trip_and_never_overwrites(tmp_path):
    g = torch.Generator().manual_seed(0)
    pairs = [AugmentedPair((torch.rand(16, 24, 3, generator=g) * 255).round() / 255, "a panda jumping into a bowl",
                           [0, 1], (torch.rand(2, 16, 24, generator=g) > 0.5).float(), {"seed": 3})]
    folder = save_dataset(pairs, tmp_path / "ds")
    back = load_dataset(folder)
    assert len(back) == 1 and back[0].class_prompt == pairs[0].class_prompt and back[0].subjects == [0, 1]
    torch.testing.assert_close(back[0].image, pairs[0].image, atol=1e-6, rtol=0)
    assert torch.equal(back[0].masks, pairs[0].masks) and back[0].meta == {"seed": 3}
    with pytest.raises(DynASynError, match="never overwritten"):
        save_dataset(pairs, folder)
    with pytest.raises(DynASynError, match="dataset.json"):
        load_dataset(tmp_path)


def _gsa_with_reverse_noise(comps, image, cfg, monkeypatch, reverse_seed=None):
    """GSA as configured; with ``reverse_seed`` the sampler's step noise (only) comes from another generator,
    so the start (VAE sample and the noise to t = 699) is the same as without it."""
    import dynasyn.gsa as gsa

    real = gsa.make_scheduler

    def make(cfg_, prediction_type):
        sched = real(cfg_, prediction_type)
        if reverse_seed is not None:
            other, step = torch.Generator().manual_seed(reverse_seed), sched.step

            def stepped(model_output, timestep, sample, generator=None, **kw):
                return step(model_output, timestep, sample, generator=other, **kw)
            sched.step = stepped
        return sched

    monkeypatch.setattr(gsa, "make_scheduler", make)
    return guided_sde_augment(comps, image, "a panda jumping into a bowl", cfg)


def test_gsa_default_reverse_pass_is_stochastic_and_seeded(monkeypatch):
    """The paper's GSA is a forward-backward SDE: from the same start, other reverse-pass noise gives another image."""
    comps = tiny_components(seed=3)
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    default = GSAConfig(steps=10, guidance_scale=5.0, seed=11)
    a, info = _gsa_with_reverse_noise(comps, image, default, monkeypatch)
    again, _ = _gsa_with_reverse_noise(comps, image, default, monkeypatch)
    other, _ = _gsa_with_reverse_noise(comps, image, default, monkeypatch, reverse_seed=12)
    assert info["start_timestep"] == 699 and info["unet_evaluations"] == 7
    assert torch.equal(a, again)                        # same seed, same image
    assert (a - other).abs().mean() > 1e-3              # same start, other reverse noise: another image
    seed2, _ = _gsa_with_reverse_noise(comps, image, GSAConfig(steps=10, guidance_scale=5.0, seed=12), monkeypatch)
    assert (a - seed2).abs().mean() > 1e-3
    # the deterministic option: the reverse pass draws nothing, the output is a function of the start
    det = GSAConfig(steps=10, guidance_scale=5.0, seed=11, sampler="ddim")
    d1, _ = _gsa_with_reverse_noise(comps, image, det, monkeypatch)
    d2, _ = _gsa_with_reverse_noise(comps, image, det, monkeypatch, reverse_seed=12)
    assert torch.equal(d1, d2)
