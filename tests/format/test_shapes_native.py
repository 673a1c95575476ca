"""The DynASyn Shapes World Model node: ComfyUI's native MODEL/CLIP/VAE compute what the shipped diffusers
modules compute, and the pack's bridge reads them back (so training, capture and drafts run on it)."""

import pytest
import torch

from tests.format.conftest import free_comfy_memory

TOL = 1e-4


@pytest.fixture(scope="module")
def shapes(pack):
    from dynasyn_pack.dynasyn.shapes.model import load_shapes_components

    model, clip, vae = pack.nodes.shapes_node.DynASynShapesWorldModel().load()
    yield model, clip, vae, load_shapes_components()
    free_comfy_memory()


def test_node_is_a_loader_with_three_outputs(pack):
    cls = pack.nodes.shapes_node.DynASynShapesWorldModel
    assert cls.CATEGORY == "DynASyn/loaders" and cls.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert pack.nodes.tiny_node.DynASynTinyModel.CATEGORY == "DynASyn/dev"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["DynASynShapesWorldModel"] == "DynASyn Shapes World Model"


def test_stock_clip_text_encode_matches_text_encoder(shapes):
    import nodes as comfy_nodes

    model, clip, vae, comps = shapes
    for prompt in ("a red ball left of a blue box on the grass", ""):
        cond = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0][0][0]
        ids = comps.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = comps.text_encoder(ids).last_hidden_state
        assert cond.shape == hidden.shape == (1, 77, 64)
        assert (cond.float() - hidden).abs().max().item() < 1e-3


def test_unet_and_vae_match(shapes):
    model, clip, vae, comps = shapes
    torch.manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    for t in (999.0, 300.0):
        tt = torch.tensor([t, t])
        with torch.no_grad():
            a = model.model.diffusion_model(x, timesteps=tt, context=c)
            b = comps.unet(x, tt, c).sample
        assert (a - b).abs().max().item() < TOL
    img = torch.rand(1, 64, 64, 3)
    with torch.no_grad():
        lat = vae.encode(img)
        assert lat.shape == (1, 4, 16, 16)  # 4x: 64 px <-> 16x16 latents
        d_lat = comps.vae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        assert (lat - d_lat).abs().max().item() < 1e-3
        dec = vae.decode(lat)
        d_dec = ((comps.vae.decode(d_lat).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        assert dec.shape == (1, 64, 64, 3) and (dec - d_dec).abs().max().item() < 1e-2


def test_bridge_reads_it_back_with_16x16_capture_layers(shapes, pack):
    from dynasyn_pack.dynasyn.attention import capture_layers

    model, clip, vae, comps = shapes
    back = pack.nodes.bridge.native_to_components(model, clip, vae)
    assert back.vae_scale_factor == 4 and back.unet.config.sample_size == 16
    layers = capture_layers(back.unet, 16)
    assert layers and all(".attentions." in n for n in layers)
    sd, ref = back.unet.state_dict(), comps.unet.state_dict()
    assert all(torch.equal(sd[k].float(), ref[k].float()) for k in ref)
