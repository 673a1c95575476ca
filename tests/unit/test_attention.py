import pytest
import torch

from dynasyn.attention import (AttentionStore, capture_layers, cross_attention_resolutions, install_attention_capture,
                               map_side, remove_attention_capture, token_maps)
from dynasyn.errors import DynASynError
from dynasyn.tiny import tiny_components


@pytest.fixture(scope="module")
def comps():
    return tiny_components(seed=0)


def test_layers_are_chosen_by_resolution(comps):
    res = cross_attention_resolutions(comps.unet, 32)
    assert res["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 32
    assert res["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] == 16
    layers = capture_layers(comps.unet, 32, 16)
    assert layers and all(res[n] == 16 for n in layers) and not any(n.startswith("mid_block") for n in layers)
    assert all(".attn2." in n for n in layers)
    # a small UNet keeps the blocks that are 16x16 at its own training size, at any training size
    assert capture_layers(comps.unet, 64, 16) == layers and map_side(comps.unet, 64) == 32
    with pytest.raises(ValueError, match="do not divide down"):
        capture_layers(comps.unet, 33, 16)


def _meta_unet(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


SD_LEVEL2 = ["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
             "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
             "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
             "up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor"]


@pytest.mark.parametrize("family", ["sd15", "sd21"])
@pytest.mark.parametrize("pixels, side", [(512, 16), (768, 24)])
def test_sd_layers_are_chosen_by_block_at_512_and_768(family, pixels, side):
    """SD 1.5 / 2.1 (real configs, meta device): down_blocks.2 + up_blocks.1 at both sizes, maps of latent / 4."""
    from tests.support.sd_fixtures import SD15_UNET, SD21_UNET

    unet = _meta_unet(**(SD15_UNET if family == "sd15" else SD21_UNET))
    latent = pixels // 8
    assert sorted(capture_layers(unet, latent)) == SD_LEVEL2
    assert map_side(unet, latent) == side
    store = AttentionStore()
    install_attention_capture(unet, store, capture_layers(unet, latent))
    store.enabled = True
    ctx = unet.config.cross_attention_dim
    unet(torch.empty(1, 4, latent, latent, device="meta"), torch.tensor([10], device="meta"),
         torch.empty(1, 77, ctx, device="meta"))
    heads = 8 if family == "sd15" else 20
    assert sorted(store.maps) == SD_LEVEL2
    assert all(tuple(m.shape) == (1, heads, side * side, 77) for m in store.maps.values())
    assert tuple(store.aggregate().shape) == (1, side, side, 77)


def test_a_small_unet_whose_top_level_is_16x16_captures_that_level():
    """A 2-level UNet trained at 16x16 latents (sample_size 16): its top level, down_blocks.0 and up_blocks.1."""
    unet = _meta_unet(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    layers = capture_layers(unet, 16)
    assert sorted(layers) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                              "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                              "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"]
    assert map_side(unet, 16) == 16
    odd = _meta_unet(sample_size=20, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    with pytest.raises(DynASynError, match="no level with 16x16"):
        capture_layers(odd, 20)


def test_capture_keeps_outputs_and_records_probabilities(comps):
    unet = comps.unet
    torch.manual_seed(0)
    x, c = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, 500, c).sample
    store = AttentionStore()
    layers = install_attention_capture(unet, store, capture_layers(unet, 32))
    try:
        procs = unet.attn_processors
        assert sum(type(p).__name__ == "CaptureAttnProcessor" for p in procs.values()) == len(layers)
        assert all(type(p).__name__ == "AttnProcessor2_0" for n, p in procs.items() if n not in layers)
        store.enabled = True
        with torch.no_grad():
            out = unet(x, 500, c).sample
        store.enabled = False
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert set(store.maps) == set(layers)
        agg = store.aggregate()
        assert agg.shape == (2, 16, 16, 77)
        torch.testing.assert_close(agg.sum(-1), torch.ones(2, 16, 16))  # probabilities over tokens
        assert (agg >= 0).all()
        maps = token_maps(agg[0], [[1], [2, 3]])
        assert maps.shape == (2, 16, 16)
        torch.testing.assert_close(maps[1], agg[0, ..., 2:4].mean(-1))
    finally:
        remove_attention_capture(unet)


def test_capture_is_differentiable_and_safe_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        comps = tiny_components(seed=0)
        unet, te = comps.unet, comps.text_encoder
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        store = AttentionStore()
        install_attention_capture(unet, store, capture_layers(unet, 32))
        ids = comps.tokenizer(["a photo of a panda"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.manual_seed(1)
        x = torch.randn(1, 4, 32, 32)
        store.enabled = True
        hidden = te(ids)[0]
        unet(x, 300, hidden)
        store.enabled = False  # the checkpointed backward re-runs the processors: they must not record
        recorded = {k: v.detach().clone() for k, v in store.maps.items()}
        loss = store.aggregate()[0, ..., 5].pow(2).mean()
        loss.backward()
        assert {k: v for k, v in store.maps.items()}.keys() == recorded.keys()
        assert all(torch.equal(store.maps[k].detach(), recorded[k]) for k in recorded)
        g = te.get_input_embeddings().weight.grad
        assert g is not None and g[ids[0, 5]].abs().sum() > 0
        grads.append(g[ids[0, 5]].clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_attention_only_pass_stops_after_the_last_hooked_layer_with_the_same_maps(comps):
    from dynasyn.attention import execution_order, last_layer, run_until_last_capture

    unet = comps.unet
    layers = capture_layers(unet, 32)
    assert last_layer(layers).startswith("up_blocks.0.attentions.1")
    assert sorted(layers, key=execution_order)[0].startswith("down_blocks.1")
    store = AttentionStore()
    install_attention_capture(unet, store, layers)
    called = []
    hook = unet.up_blocks[1].register_forward_hook(lambda *a: called.append(1))  # the 32x32 block after the last 16x16 layer
    try:
        x, c = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
        store.enabled = True
        with torch.no_grad():
            unet(x, 200, c)
        full = store.aggregate().clone()
        store.clear()
        called.clear()
        with torch.no_grad():
            run_until_last_capture(unet, store, x, 200, c)
        store.enabled = False
        assert called == []  # the rest of the UNet did not run
        torch.testing.assert_close(store.aggregate(), full)
        assert store.stop_after is None
    finally:
        hook.remove()
        remove_attention_capture(unet)


def test_recorded_maps_equal_a_hand_computed_softmax_of_q_k(comps):
    """store.maps[layer][b, h] = softmax(Q_h K_h^T / sqrt(d)) from the layer's own to_q / to_k (head order kept)."""
    unet = comps.unet
    layers = capture_layers(unet, 32)
    store = AttentionStore()
    install_attention_capture(unet, store, layers)
    layer = layers[0]
    attn = unet.get_submodule(layer.rsplit(".processor", 1)[0])
    seen = {}
    hook = attn.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(h=args[0] if args else kwargs["hidden_states"],
                                                                               c=kwargs["encoder_hidden_states"]),
                                          with_kwargs=True)
    try:
        g = torch.Generator().manual_seed(3)
        x, c = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
        store.enabled = True
        with torch.no_grad():
            unet(x, 400, c)
        store.enabled = False
        with torch.no_grad():
            q, k = attn.to_q(seen["h"]), attn.to_k(seen["c"])
            b, n, inner = q.shape
            heads, d = attn.heads, inner // attn.heads
            qh = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)        # [b, heads, HW, d]
            kh = k.reshape(b, k.shape[1], heads, d).permute(0, 2, 1, 3)
            hand = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
        assert heads > 1 and store.maps[layer].shape == hand.shape
        torch.testing.assert_close(store.maps[layer], hand, atol=1e-6, rtol=1e-5)
    finally:
        hook.remove()
        remove_attention_capture(unet)
