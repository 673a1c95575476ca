import pytest
import torch

from dynasyn.attention import (AttentionStore, capture_layers, cross_attention_resolutions, install_attention_capture,
                               remove_attention_capture, token_maps)
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
    with pytest.raises(ValueError, match="No cross-attention layer works at 16x16"):
        capture_layers(comps.unet, 8, 16)


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
