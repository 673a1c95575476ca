"""The draft renderer's attn2 patch keeps the model's attention precision (SD 2.x: fp32 attention)."""

import importlib

import torch


def test_draft_capture_passes_the_models_attn_precision(pack, monkeypatch):
    render = importlib.import_module("dynasyn_pack.nodes.comfy_render")
    seen = []
    real = render.optimized_attention

    def recording(q, k, v, heads, **kw):
        seen.append(kw.get("attn_precision"))
        return real(q, k, v, heads, **kw)

    monkeypatch.setattr(render, "optimized_attention", recording)
    capture = render.NativeAttentionCapture(level=0)  # the 4x4 latent's own level
    q, k, v = torch.randn(2, 16, 8), torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    opts = {"n_heads": 2, "original_shape": [2, 8, 4, 4], "block": ("output", 1), "cond_or_uncond": [0, 1],
            "attn_precision": torch.float32}
    out = capture(q, k, v, opts)
    assert out.shape == (2, 16, 8) and seen == [torch.float32]
    assert capture.total.device == q.device and capture.maps(4, 4).shape == (1, 4, 4, 77)
