"""dynasyn.lora on small random modules: the factors, their error, names, file, bad input."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dynasyn.errors import InvalidNameError, TargetExistsError
from dynasyn.lora import (LoraError, extract_lora, kohya_name, kohya_te_name, lora_factors, lora_metadata, save_lora_file,
                          summarize)

FULL = 4096
TOL_FP32 = 1e-5  # relative, fp32 SVD round trip
TOL_FP16 = 2e-3  # relative, factors stored in fp16 (11-bit mantissa)


class Block(torch.nn.Module):
    """Each layer kind a UNet / CLIP has: linear, 3x3 and 1x1 conv, norm, embedding table."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 12)
        self.proj_in = torch.nn.Conv2d(8, 12, 1)
        self.conv1 = torch.nn.Conv2d(12, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.to_q = torch.nn.Linear(16, 24, bias=False)
        self.ff = torch.nn.Linear(24, 10)


def changed_pair(seed=0, scale=0.1):
    torch.manual_seed(seed)
    base = Block()
    trained = copy.deepcopy(base)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * scale)
    return base.state_dict(), trained.state_dict()


def rebuild(lora, base_sd, prefix="lora_unet_"):
    """Apply a LoRA the way ComfyUI's loader does (up.flatten(1) @ down.flatten(1) * alpha / rank, plus .diff/.diff_b)."""
    out = {}
    for k, w in base_sd.items():
        module, leaf = k.rsplit(".", 1)
        name = kohya_name(prefix, module)
        w = w.clone().float()
        if leaf == "weight" and f"{name}.lora_up.weight" in lora:
            up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
            scale = lora[f"{name}.alpha"].item() / down.shape[0]
            w += scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        elif leaf == "weight" and f"{name}.diff" in lora:
            w += lora[f"{name}.diff"].float()
        elif leaf == "bias" and f"{name}.diff_b" in lora:
            w += lora[f"{name}.diff_b"].float()
        out[k] = w
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, TOL_FP32), (torch.float16, TOL_FP16)])
def test_full_rank_reproduces_every_changed_tensor(dtype, tol):
    base, trained = changed_pair()
    lora = extract_lora(base, trained, FULL, dtype=dtype)
    back = rebuild(lora, base)
    for k in base:
        assert rel(back[k] - base[k], trained[k] - base[k]) < tol, k  # the change itself, not just the weight


def test_rank_k_is_the_best_rank_k_approximation():
    torch.manual_seed(1)
    d = torch.randn(24, 16)
    s = torch.linalg.svdvals(d)
    for k in (1, 4, 15):
        up, down, r, err = lora_factors(d, k)
        assert r == k and up.shape == (24, k) and down.shape == (k, 16)
        optimum = (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()  # Eckart-Young
        assert rel(up @ down, d) == pytest.approx(err, rel=1e-4)
        assert err == pytest.approx(optimum, rel=1e-4)
        q, _ = torch.linalg.qr(torch.randn(24, k))  # any other rank-k approximation does worse
        assert rel(q @ (q.T @ d), d) > err
    assert lora_factors(d, 64)[2:] == (16, pytest.approx(0.0, abs=1e-6))


def test_conv_3x3_layout_is_comfy_and_kohya():
    torch.manual_seed(2)
    d = torch.randn(16, 12, 3, 3)
    up, down, r, _ = lora_factors(d, 5)
    assert up.shape == (16, 5, 1, 1) and down.shape == (5, 12, 3, 3)
    up, down, r, err = lora_factors(d, FULL)
    assert r == 16 and err < 1e-6
    assert rel((up.flatten(1) @ down.flatten(1)).reshape(d.shape), d) < TOL_FP32


def test_lower_rank_is_worse_but_finite():
    base, trained = changed_pair(seed=3)
    errors = []
    for rank in (1, 2, 4, 8, FULL):
        stats = []
        lora = extract_lora(base, trained, rank, stats=stats)
        assert all(torch.isfinite(t).all() for t in lora.values())
        errors.append(summarize(stats)["rel_error"])
        w = rebuild(lora, base)["to_q.weight"]
        assert rel(w - base["to_q.weight"], trained["to_q.weight"] - base["to_q.weight"]) == pytest.approx(
            next(s["rel_error"] for s in stats if s["key"] == "to_q.weight"), abs=3e-3)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3 and errors[-1] < 1e-6


def test_key_names_and_alpha():
    base, trained = changed_pair()
    lora = extract_lora(base, trained, 4)
    assert set(lora) == {
        "lora_unet_emb.lora_up.weight", "lora_unet_emb.lora_down.weight", "lora_unet_emb.alpha",
        "lora_unet_proj_in.lora_up.weight", "lora_unet_proj_in.lora_down.weight", "lora_unet_proj_in.alpha",
        "lora_unet_proj_in.diff_b",
        "lora_unet_conv1.lora_up.weight", "lora_unet_conv1.lora_down.weight", "lora_unet_conv1.alpha", "lora_unet_conv1.diff_b",
        "lora_unet_norm.diff", "lora_unet_norm.diff_b",
        "lora_unet_to_q.lora_up.weight", "lora_unet_to_q.lora_down.weight", "lora_unet_to_q.alpha",
        "lora_unet_ff.lora_up.weight", "lora_unet_ff.lora_down.weight", "lora_unet_ff.alpha", "lora_unet_ff.diff_b",
    }
    assert lora["lora_unet_to_q.alpha"].item() == 4 and lora["lora_unet_to_q.lora_up.weight"].dtype == torch.float16
    assert lora["lora_unet_proj_in.lora_down.weight"].shape == (4, 8, 1, 1)
    assert lora["lora_unet_proj_in.alpha"].item() == 4
    no_norms = extract_lora(base, trained, 4, biases_and_norms=False)
    assert not [k for k in no_norms if k.endswith((".diff", ".diff_b"))] and len(no_norms) == 15
    named = extract_lora(base, trained, 4, names=lambda m: None if m == "emb" else f"x_{m}")
    assert "x_to_q.lora_up.weight" in named and not [k for k in named if "emb" in k]


def test_kohya_names_for_unet_and_clip():
    assert kohya_name("lora_unet_", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"
    assert kohya_te_name("text_model.encoder.layers.11.self_attn.out_proj") == \
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    assert kohya_te_name("text_model.encoder.layers.0.mlp.fc2") == "lora_te_text_model_encoder_layers_0_mlp_fc2"
    for other in ("text_model.encoder.layers.0.layer_norm1", "text_model.embeddings.token_embedding",
                  "text_model.final_layer_norm"):
        assert kohya_te_name(other) is None  # ComfyUI maps no lora_te_ name for them


def test_unchanged_tensors_are_skipped():
    base, trained = changed_pair()
    trained = dict(trained)
    for k in ("to_q.weight", "norm.weight", "norm.bias"):
        trained[k] = base[k].clone()
    lora = extract_lora(base, trained, 4)
    assert not [k for k in lora if "to_q" in k or "norm" in k]
    assert extract_lora(base, dict(base), 4) == {}


def test_different_architectures_are_refused():
    base, trained = changed_pair()
    wider = dict(trained, **{"to_q.weight": torch.zeros(32, 16)})
    with pytest.raises(LoraError, match="different architectures.*to_q.weight.*Connect the base model"):
        extract_lora(base, wider, 4, what="MODEL")
    fewer = {k: v for k, v in trained.items() if k != "ff.bias"}
    with pytest.raises(LoraError, match="different architectures: 1 weights exist in only one"):
        extract_lora(base, fewer, 4)


@pytest.mark.parametrize("rank", [0, -3, 4097, 2.5, "8", True, None])
def test_rank_out_of_range_is_refused(rank):
    base, trained = changed_pair()
    with pytest.raises(LoraError, match="rank must be a whole number from 1 to 4096"):
        extract_lora(base, trained, rank)


def test_non_finite_change_is_refused():
    base, trained = changed_pair()
    trained = dict(trained, **{"ff.weight": torch.full_like(trained["ff.weight"], float("nan"))})
    with pytest.raises(LoraError, match="NaN or infinite values in ff.weight"):
        extract_lora(base, trained, 4)


def test_an_untouched_weight_holding_nan_is_unchanged_not_an_error():
    """ComfyUI leaves SD 1.x CLIP's unused text_projection as uninitialised memory, which may hold NaN (a flaky
    'trained CLIP holds NaN' refusal of every LoRA export before): the same bits in both models are no change."""
    base, trained = changed_pair()
    garbage = torch.full_like(base["ff.weight"], float("nan"))
    garbage[0, 0] = 1.0
    base, trained = dict(base, **{"ff.weight": garbage}), dict(trained, **{"ff.weight": garbage.clone()})
    out = extract_lora(base, trained, 4)
    assert out and "lora_unet_ff.lora_up.weight" not in out and "lora_unet_ff.diff_b" in out  # its bias did change
    assert all(torch.isfinite(v).all() for v in out.values())


def test_clamp_quantile_bounds_the_factors():
    torch.manual_seed(4)
    d = torch.randn(40, 30)
    d[0, 0] = 50.0  # an outlier
    up, down, _, _ = lora_factors(d, 30)
    cu, cd, _, _ = lora_factors(d, 30, clamp_quantile=0.99)
    hi = torch.cat([cu.flatten(), cd.flatten()]).abs().max()
    assert hi < torch.cat([up.flatten(), down.flatten()]).abs().max()
    assert rel(up @ down, d) < TOL_FP32 < rel(cu @ cd, d)  # clamping costs exactness: off by default


def test_file_has_metadata_and_is_never_overwritten(tmp_path):
    base, trained = changed_pair()
    lora = extract_lora(base, trained, 4)
    meta = lora_metadata(4, "sd15", {"rel_error": 0.1, "base_model": "v1-5.safetensors"})
    path = save_lora_file(tmp_path, "my_lora", lora, meta)
    assert path == tmp_path / "my_lora.safetensors"
    loaded = load_file(path)
    assert set(loaded) == set(lora) and all(torch.equal(loaded[k], lora[k]) for k in lora)
    with safe_open(str(path), "pt") as f:
        m = f.metadata()
    assert m["ss_network_dim"] == "4" and m["ss_base_model_version"] == "sd_v1" and m["ss_network_module"] == "networks.lora"
    assert json.loads(m["dynasyn"]) == {"rank": 4, "family": "sd15", "rel_error": 0.1, "base_model": "v1-5.safetensors"}
    before = path.read_bytes()
    with pytest.raises(TargetExistsError, match="will not be overwritten"):
        save_lora_file(tmp_path, "my_lora", lora, meta)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_lora.safetensors"]  # no temporary file left


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "..", "x y", ""])
def test_name_attacks_are_refused(tmp_path, name):
    base, trained = changed_pair()
    inner = tmp_path / "loras"
    with pytest.raises(InvalidNameError, match="LoRA name"):
        save_lora_file(inner, name, extract_lora(base, trained, 2))
    assert not inner.exists() and list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_nothing_changed_is_a_clear_error(tmp_path):
    with pytest.raises(LoraError, match="equals the base model"):
        save_lora_file(tmp_path, "empty", {})
