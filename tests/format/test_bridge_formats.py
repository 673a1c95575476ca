"""ComfyUI's own loaders vs the bridged diffusers/transformers modules, at real SD 1.5 / 2.1 size."""

import types

import pytest
import torch
from safetensors.torch import load_file

from tests.format.conftest import free_comfy_memory

pytestmark = pytest.mark.slow
TOL = 1e-4  # fp32 on CPU


def test_unet_prediction_agrees(native, bridged):
    family, model, clip, vae = native
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32)
    c = torch.randn(1, 77, bridged.unet.config.cross_attention_dim)
    for t in (999.0, 500.0, 1.0):
        tt = torch.tensor([t])
        with torch.no_grad():
            native_out = model.model.diffusion_model(x, timesteps=tt, context=c)
            diffusers_out = bridged.unet(x, tt, c).sample
        assert native_out.abs().max() > 0.1
        assert (native_out - diffusers_out).abs().max().item() < TOL


@pytest.mark.parametrize("prompt", ["a photo of a dog", "a toy panda jumping into a green bowl on the beach, "
                                    "sunny day, detailed, high quality"])
def test_conditioning_agrees_with_stock_clip_text_encode(native, bridged, prompt):
    import nodes as comfy_nodes

    family, model, clip, vae = native
    cond = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0][0][0]
    ids = bridged.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = bridged.text_encoder(ids)[0]
    assert cond.shape == hidden.shape == (1, 77, 768 if family == "sd15" else 1024)
    assert (cond - hidden).abs().max().item() < TOL


def test_prediction_type_and_schedule(native, bridged, pack):
    family, model, clip, vae = native
    expected = "epsilon" if family == "sd15" else "v_prediction"
    assert bridged.prediction_type == expected
    assert pack.nodes.bridge.prediction_type(model) == expected
    m, c = pack.nodes.bridge.components_to_native(model, clip, bridged)
    assert pack.nodes.bridge.prediction_type(m) == expected
    sched = bridged.noise_scheduler
    sigmas = model.get_model_object("model_sampling").sigmas.float()  # sigma_t = sqrt((1 - abar_t) / abar_t)
    torch.testing.assert_close(sched.alphas_cumprod.float(), 1 / (1 + sigmas ** 2), rtol=1e-4, atol=1e-6)


def test_vae_agrees(native, bridged):
    family, model, clip, vae = native
    img = torch.rand(1, 64, 64, 3)
    with torch.no_grad():
        native_latent = vae.encode(img)  # ComfyUI takes [B,H,W,C] in 0..1 and returns the distribution mean
        d_latent = bridged.vae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    assert (native_latent - d_latent).abs().max().item() < 1e-3


def _changed_copy(comps, seed=1):
    """Deliberately changed UNet / text-encoder weights (returns (unet_sd, te_sd))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("conv_in.weight", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
            p = comps.unet.get_parameter(name)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        params = dict(comps.text_encoder.named_parameters())  # names differ between transformers 4 and 5
        for suffix in ("encoder.layers.0.mlp.fc1.weight", "final_layer_norm.weight"):
            p = next(v for k, v in params.items() if k.endswith(suffix))
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _clip_storage_dtype(clip):
    return clip.cond_stage_model.state_dict()[next(k for k in clip.cond_stage_model.state_dict() if k.endswith("fc1.weight"))].dtype


def _as_stored(te, clip):
    """A copy of ``te`` with weights rounded to the dtype ComfyUI stores this CLIP in (fp16 on some devices)."""
    import copy

    dtype = _clip_storage_dtype(clip)
    ref = copy.deepcopy(te)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    return ref


def test_patched_clone_carries_trained_weights_and_leaves_original(native, bridged, pack):
    import comfy.model_management

    family, model, clip, vae = native
    bridge = pack.nodes.bridge
    base_conv = model.model.diffusion_model.input_blocks[0][0].weight.detach().clone()
    _changed_copy(bridged)
    m, c = bridge.components_to_native(model, clip, bridged)
    assert len(model.patches) == 0 and len(clip.patcher.patches) == 0  # the original is not mutated
    x = torch.randn(1, 4, 32, 32)
    ctx = torch.randn(1, 77, bridged.unet.config.cross_attention_dim)
    comfy.model_management.load_models_gpu([m], force_patch_weights=True)
    with torch.no_grad():
        out = m.model.diffusion_model(x, timesteps=torch.tensor([400.0]), context=ctx)
        ref = bridged.unet(x, torch.tensor([400.0]), ctx).sample
    assert (out - ref).abs().max().item() < TOL
    import nodes as comfy_nodes
    cond = comfy_nodes.CLIPTextEncode().encode(c, "a photo of a dog")[0][0][0]
    ids = bridged.tokenizer("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (cond - _as_stored(bridged.text_encoder, clip)(ids)[0]).abs().max().item() < TOL
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight, base_conv)
    del m, c
    free_comfy_memory()


def test_exported_embedding_matches_placeholder_token(native, bridged, pack, tmp_path):
    import nodes as comfy_nodes

    family, model, clip, vae = native
    export = pack.dynasyn.export
    tok, te = bridged.tokenizer, bridged.text_encoder
    tok.add_tokens(["<asset0>"])
    te.resize_token_embeddings(len(tok))
    vec = torch.randn(te.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.02
    with torch.no_grad():
        te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<asset0>")] = vec
    export.save_embedding(tmp_path, "my_panda", vec)
    assert load_file(tmp_path / "my_panda.safetensors")["emb_params"].shape == (1, te.config.hidden_size)
    # The same CLIP with tmp_path as its embedding folder, as CheckpointLoaderSimple sets models/embeddings.
    clip_e = clip.clone()
    clip_e.tokenizer = type(clip.tokenizer)(embedding_directory=[str(tmp_path)])
    cond = comfy_nodes.CLIPTextEncode().encode(clip_e, "a photo of embedding:my_panda in a bowl")[0][0][0]
    ids = tok("a photo of <asset0> in a bowl", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids)[0]
    base = comfy_nodes.CLIPTextEncode().encode(clip_e, "a photo of dog in a bowl")[0][0][0]
    assert (cond - base).abs().max() > 1e-3  # the embedding really was used
    # the bridged encoder here may carry changed weights from the previous test; compare on the same weights
    te_base = pack.nodes.bridge.native_text_encoder_to_transformers(clip_e)[0]
    te_base.resize_token_embeddings(len(tok))
    with torch.no_grad():
        te_base.get_input_embeddings().weight[-1] = vec
        hidden = te_base(ids)[0]
    assert (cond - hidden).abs().max().item() < TOL


def test_checkpoint_export_round_trip(native, bridged, pack, tmp_path):
    import comfy.sd

    family, model, clip, vae = native
    bridge = pack.nodes.bridge
    _changed_copy(bridged, seed=7)
    m, c = bridge.components_to_native(model, clip, bridged)
    path = bridge.save_checkpoint(tmp_path, "trained", m, c, vae, metadata={"steps": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained.safetensors"]
    with pytest.raises(pack.dynasyn.errors.TargetExistsError, match="already exists"):
        bridge.save_checkpoint(tmp_path, "trained", m, c, vae)
    del m, c
    free_comfy_memory()
    m2, c2, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    assert bridge.prediction_type(m2) == bridged.prediction_type
    mapping = bridge.unet_key_map(model)
    sd2 = m2.model.diffusion_model.state_dict()
    for dk in ("conv_in.weight", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.bias"):
        assert torch.equal(sd2[mapping[dk]].float(), bridged.unet.state_dict()[dk].float())
    back = bridge.native_text_encoder_to_transformers(c2)[0].state_dict()
    for k, v in _as_stored(bridged.text_encoder, clip).state_dict().items():
        if "token_embedding" in k:
            v = v[:49408]
        assert torch.equal(back[k], v), k
    del m2, c2, back
    free_comfy_memory()


def test_unsupported_models_get_a_clear_error(pack):
    import comfy.supported_models as sm

    bridge = pack.nodes.bridge
    err = pack.dynasyn.errors.UnsupportedModelError
    unet_config = {"in_channels": 4, "model_channels": 320, "context_dim": 2048, "use_linear_in_transformer": True,
                   "adm_in_channels": 2816, "use_temporal_attention": False, "transformer_depth": [0, 0, 2, 2, 10, 10]}
    for cls in (sm.SDXL, sm.SD15_instructpix2pix, sm.SD21UnclipH, sm.Flux, sm.SD3):
        fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cls(dict(unet_config))))
        with pytest.raises(err) as e:
            bridge.model_family(fake)
        assert cls.__name__ in str(e.value) and "SD 1.5 or SD 2.1" in str(e.value)


def test_native_drafts_capture_the_16x16_layers_at_512(native, pack):
    """The augmentation's drafts on the real architectures: ComfyUI's sampler, 512 px, the 16x16 attn2 blocks."""
    import importlib

    family, model, clip, vae = native
    render = importlib.import_module("dynasyn_pack.nodes.comfy_render")
    aug = importlib.import_module("dynasyn_pack.dynasyn.augment")
    template = importlib.import_module("dynasyn_pack.dynasyn.prompts").PromptTemplate("[1] sitting in [2] on a beach")
    capture = render.NativeAttentionCapture()
    real = render.NativeAttentionCapture
    render.NativeAttentionCapture = lambda: capture  # to count the layers the renderer's capture saw
    try:
        cfg = aug.AugmentConfig(size=512, draft_steps=1, guidance_scale=5.0)
        draft, = render.ComfyRenderer(model, clip, vae, cfg, "euler", "normal").drafts(
            [template], ["red panda", "blue bowl"], [0], (512, 512))
    finally:
        render.NativeAttentionCapture = real
    # SD 1.x / 2.x at 512 px: input blocks 7, 8 and output blocks 3, 4, 5 are 16x16 (not the 8x8 middle), once per step
    assert capture.calls == 5
    assert draft.image.shape == (512, 512, 3) and draft.attention.shape == (2, 16, 16)
    assert torch.isfinite(draft.attention).all() and (draft.attention > 0).all()
    free_comfy_memory()


@pytest.mark.parametrize("latent", [64, 96])
def test_native_capture_picks_the_library_blocks_at_512_and_768(native, pack, latent):
    """ComfyUI's attn2 patch captures SD's down_blocks.2 / up_blocks.1 (input 7, 8; output 3, 4, 5) at 512 and 768 px,
    maps of latent / 4 (24x24 at 768 px, where no 16x16 layer exists)."""
    import importlib

    _, model, _, _ = native
    render = importlib.import_module("dynasyn_pack.nodes.comfy_render")
    capture = render.NativeAttentionCapture()
    patched = render.with_attention_capture(model, capture)
    ctx = model.model.model_config.unet_config["context_dim"]
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [0]}
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([500.0]))
    with torch.no_grad():
        patched.model.apply_model(x, sigma, c_crossattn=torch.randn(1, 77, ctx), transformer_options=options)
    assert capture.blocks == {("input", 7), ("input", 8), ("output", 3), ("output", 4), ("output", 5)}
    assert capture.calls == 5
    assert capture.maps(latent, latent).shape == (1, latent // 4, latent // 4, 77)
    free_comfy_memory()
