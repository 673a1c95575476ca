"""The augmentation stage on the native MODEL (ComfyUI's sampler) agrees with the library's diffusers path.

Tiny random model with the real CLIP vocabulary, made native by the bridge, in-process ComfyUI.
"""

import importlib

import pytest
import torch

from tests.support.scene import tensor_scene as scene


def _mod(name):
    return importlib.import_module(f"dynasyn_pack.{name}")


@pytest.fixture(scope="module")
def tiny(tiny_native):
    return tiny_native


def test_native_capture_equals_library_capture(tiny):
    """One UNet call, same input and conditioning: the 16x16 maps of ComfyUI's attn2 patch = the diffusers processors'."""
    render, attention = _mod("nodes.comfy_render"), _mod("dynasyn.attention")
    comps, model, clip, _ = tiny
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red panda sitting in a blue bowl"))[0][0]
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigma(torch.tensor([500.0]))

    capture = render.NativeAttentionCapture()
    patched = render.with_attention_capture(model, capture)
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0]}
    native_out = patched.model.apply_model(x, sigma, c_crossattn=cond, transformer_options=options)
    native_maps = capture.maps(32, 32)[0]

    store = attention.AttentionStore()
    attention.install_attention_capture(comps.unet, store, attention.capture_layers(comps.unet, 32, 16))
    try:
        store.enabled = True
        with torch.no_grad():
            eps = comps.unet(x / (sigma ** 2 + 1) ** 0.5, ms.timestep(sigma), encoder_hidden_states=cond).sample
        lib_maps = store.aggregate()[0]
    finally:
        attention.remove_attention_capture(comps.unet)
    assert capture.calls == len(store.maps) == 3  # the 16x16 layers: 1 down, 2 up; not the middle block
    assert native_maps.shape == lib_maps.shape == (16, 16, 77)
    assert torch.allclose(native_maps, lib_maps, atol=1e-5)
    assert torch.allclose(native_out, x - eps * sigma, atol=1e-4)  # and the output is the model's normal output


@pytest.mark.parametrize("prompt, phrases", [
    ("a red panda sitting in a blue bowl", ["red panda", "blue bowl"]),
    ("the teddy bear, hugging a panda on the beach", ["teddy bear", "panda"]),
    ("a cat and a cat playing", ["cat", "cat"]),
])
def test_description_positions_follow_comfy_tokenization(tiny, prompt, phrases):
    comps, _, clip, _ = tiny
    got = _mod("nodes.comfy_render").description_positions(clip, prompt, phrases)
    assert got == _mod("dynasyn.subjects").token_positions(comps.tokenizer, prompt, phrases)
    with pytest.raises(_mod("dynasyn.errors").DynASynError, match="not in the prompt"):
        _mod("nodes.comfy_render").description_positions(clip, prompt, ["dragon"])


@pytest.mark.parametrize("template, names", [
    ("a toy cat beside a box, [1] chasing [2]", ["cat", "dog"]),
    ("a ball next to a box, the [1] jumping", ["ball"]),
])
def test_description_positions_start_at_the_marker_not_at_a_prop(tiny, template, names):
    comps, _, clip, _ = tiny
    t = _mod("dynasyn.prompts").PromptTemplate(template)
    prompt, phrases = t.render(names), [names[i] for i in t.subjects]
    got = _mod("nodes.comfy_render").description_positions(clip, prompt, phrases, t.before_markers(names))
    assert got == _mod("dynasyn.drafts").draft_positions(comps.tokenizer, t, names)
    assert got != _mod("nodes.comfy_render").description_positions(clip, prompt, phrases)  # by word alone: the prop


@pytest.fixture(scope="module")
def renderer(tiny):
    comps, model, clip, vae = tiny
    aug, gsa = _mod("dynasyn.augment"), _mod("dynasyn.gsa")
    cfg = aug.AugmentConfig(size=64, draft_steps=3, inpaint_steps=3, guidance_scale=5.0,
                            gsa=gsa.GSAConfig(steps=10, guidance_scale=5.0))
    return _mod("nodes.comfy_render").ComfyRenderer(model, clip, vae, cfg, "euler", "normal")


def test_batched_drafts_equal_single_drafts(renderer):
    templates = _mod("dynasyn.prompts").offline_prompts(2, 3, seed=0)
    descriptions = ["red panda", "blue bowl"]
    batch = renderer.drafts(templates, descriptions, [7, 8, 9], (64, 64))
    single = renderer.drafts(templates[1:2], descriptions, [8], (64, 64))[0]
    assert [d.image.shape for d in batch] == [(64, 64, 3)] * 3
    assert batch[1].prompt == single.prompt and batch[1].attention.shape == (2, 16, 16)
    assert torch.allclose(batch[1].image, single.image, atol=1e-4)
    assert torch.allclose(batch[1].attention, single.attention, atol=1e-5)
    assert not torch.allclose(batch[0].image, batch[1].image)  # each prompt its own seed


def test_native_inpaint_keeps_known_pixels_and_gsa_starts_at_700(renderer):
    image, _, _ = scene()
    mask = torch.zeros(64, 64)
    mask[20:40, 10:50] = 1
    out, evals = renderer.inpaint(image, mask, "a red panda", seed=1)
    keep = mask == 0
    assert evals == 3 and torch.equal(out[keep], image[keep].float())
    assert (out[~keep] - image[~keep]).abs().mean() > 1e-3  # the hole was repainted
    gsa_image, info = renderer.gsa(out, "a red panda", seed=1)
    assert gsa_image.shape == (64, 64, 3) and info == {"start_timestep": 699, "unet_evaluations": 7}
    # without SAM the stage re-segments the GSA output with the subjects' attention during the pass
    again, info = renderer.gsa(out, "a red panda in a blue bowl", seed=1, phrases=["red panda", "blue bowl"])
    assert info["attention"].shape == (2, 16, 16) and torch.isfinite(info["attention"]).all()


def test_whole_stage_on_the_native_model(renderer):
    aug = _mod("dynasyn.augment")
    image, masks, nouns = scene()
    templates = _mod("dynasyn.prompts").offline_prompts(2, 3, seed=0)
    renderer.cfg.draft_batch = 2
    report = aug.augment(renderer, image, list(masks), nouns, nouns, templates, renderer.cfg)
    assert len(report.drafts) == 3 and len(report.pairs) + len(report.skipped) == 3
    for pair in report.pairs:
        assert pair.image.shape == (64, 64, 3) and pair.masks.shape[0] == len(pair.subjects)
        assert pair.meta["start_timestep"] == 699
        assert pair.meta["mask_source"] == "resegmented" and torch.equal(pair.masks, pair.meta["resegmented_masks"])
        assert pair.meta["pasted_masks"].shape == pair.masks.shape


def test_native_gsa_default_sampler_is_stochastic(tiny, monkeypatch):
    """Both nodes default to the paper's stochastic reverse pass: from the same start noise, another seed gives
    another image (ComfyUI seeds the sampler's step noise with it); the deterministic option does not."""
    import comfy.sample

    render = _mod("nodes.comfy_render")
    _, model, clip, vae = tiny
    gsa_default = _mod("nodes.gsa_node").DynASynGSA.INPUT_TYPES()["required"]["sampler_name"][1]["default"]
    augment_default = _mod("nodes.augment_nodes").DynASynAugment.INPUT_TYPES()["required"]["gsa_sampler"][1]["default"]
    assert gsa_default == augment_default == _mod("dynasyn.gsa").GSAConfig().sampler == "ddpm"
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red panda"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    image = scene()[0][None]
    real = comfy.sample.prepare_noise
    monkeypatch.setattr(comfy.sample, "prepare_noise", lambda latent, seed, *a, **k: real(latent, 0, *a, **k))

    def run(sampler, seed):
        out, start_t, steps = render.comfy_gsa(model, positive, negative, vae, image, 0.7, 10, sampler, 5.0, seed,
                                               callback=lambda *a: None)
        assert (start_t, steps) == (699, 7)
        return out

    a = run(gsa_default, 1)
    assert torch.equal(a, run(gsa_default, 1))
    assert (a - run(gsa_default, 2)).abs().mean() > 1e-3
    assert torch.allclose(run("ddim", 1), run("ddim", 2))
