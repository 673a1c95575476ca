"""A LoRA extracted from a changed tiny native model, loaded back by ComfyUI's own LoRA path, reproduces it."""

import copy
import logging
import os

import pytest
import torch

from tests.format.conftest import free_comfy_memory

FULL = 4096
# fp16 factors: the trained change is kept to ~1e-3 of itself, and the change is ~5% of the weights,
# so predictions agree to well under 1e-3 of their scale (fp32 CPU inference otherwise).
TOL_UNET = 5e-4
TOL_TE = 5e-4


@pytest.fixture(scope="module")
def trained(tiny_native, pack):
    """(base MODEL, base CLIP, trained MODEL, trained CLIP): every UNet / text-encoder weight changed, carried as the
    Train node carries them (patched clones of the base)."""
    comps, model, clip, _ = tiny_native
    changed = copy.copy(comps)
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode(False), torch.no_grad():
        changed.unet, changed.text_encoder = copy.deepcopy(comps.unet), copy.deepcopy(comps.text_encoder)
        for module in (changed.unet, changed.text_encoder):
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() if p.numel() > 1 else 1.0).clamp(min=0.02))
    m, c = pack.nodes.bridge.components_to_native(model, clip, changed)
    yield model, clip, m, c
    free_comfy_memory()


@pytest.fixture()
def loras_dir(pack, tmp_path, monkeypatch):
    import folder_paths

    d = tmp_path / "models" / "loras"
    d.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(d)], {".safetensors"}))
    return d


def _unet_out(patcher):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)  # patches the shared module in place
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 77, patcher.model.model_config.unet_config["context_dim"])
    with torch.no_grad():
        return torch.cat([patcher.model.diffusion_model(x, timesteps=torch.tensor([t]), context=ctx)
                          for t in (900.0, 300.0, 5.0)])


def _te_out(clip, text="a photo of a dog and a bowl on the beach"):
    import nodes as comfy_nodes

    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def _load(path, model, clip, caplog):
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)  # what LoraLoader does
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        m, c = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert unloaded == []  # every key found its layer
    return m, c, lora


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_full_rank_lora_reproduces_the_trained_model(trained, pack, loras_dir, caplog):
    base_m, base_c, tr_m, tr_c = trained
    bridge = pack.nodes.bridge
    ref_unet, ref_te = _unet_out(tr_m), _te_out(tr_c)  # the trained model was just used: its weights sit in the module
    base_unet, base_te = _unet_out(base_m), _te_out(base_c)
    assert rel(base_unet, ref_unet) > 0.05 and rel(base_te, ref_te) > 0.05  # the change is large enough to see
    _unet_out(tr_m)
    path, summary = bridge.save_lora(loras_dir, "full", base_m, tr_m, base_c, tr_c, FULL, metadata={"base_model": "tiny"})
    assert summary["rel_error"] < 1e-5 and summary["layers"] > 50
    m, c, lora = _load(path, base_m, base_c, caplog)
    names = set(lora)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.") for k in names)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in names)
    assert any(k.startswith("lora_unet_conv_in.lora_down") for k in names)  # 3x3 convs as core writes them
    assert lora["lora_unet_conv_in.lora_down.weight"].ndim == 4
    assert all(v.dtype == torch.float16 for k, v in lora.items() if not k.endswith(".alpha"))
    out_unet, out_te = _unet_out(m), _te_out(c)
    assert rel(out_unet, ref_unet) < TOL_UNET, rel(out_unet, ref_unet)
    assert rel(out_te, ref_te) < TOL_TE, rel(out_te, ref_te)
    assert torch.equal(_unet_out(base_m), base_unet)  # the base is untouched
    del m, c
    free_comfy_memory()


def test_low_rank_is_worse_but_finite(trained, pack, loras_dir, caplog):
    base_m, base_c, tr_m, tr_c = trained
    bridge = pack.nodes.bridge
    ref_unet, ref_te = _unet_out(tr_m), _te_out(tr_c)
    base_unet = _unet_out(base_m)
    errors = []
    for rank in (2, 8):
        path, summary = bridge.save_lora(loras_dir, f"r{rank}", base_m, tr_m, base_c, tr_c, rank)
        m, c, lora = _load(path, base_m, base_c, caplog)
        out_unet, out_te = _unet_out(m), _te_out(c)
        assert torch.isfinite(out_unet).all() and torch.isfinite(out_te).all()
        errors.append((summary["rel_error"], rel(out_unet, ref_unet), rel(out_te, ref_te)))
        assert max(v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight")) == rank
    (s2, u2, t2), (s8, u8, t8) = errors
    assert s2 > s8 > 0.1 and u2 > TOL_UNET and t2 > TOL_TE
    assert u8 < rel(base_unet, ref_unet)  # a low rank still moves the base toward the trained model
    free_comfy_memory()


def test_unet_only_and_without_biases(trained, pack, loras_dir, caplog):
    base_m, base_c, tr_m, tr_c = trained
    bridge = pack.nodes.bridge
    path, _ = bridge.save_lora(loras_dir, "unet_only", base_m, tr_m, None, None, FULL, biases_and_norms=False)
    m, c, lora = _load(path, base_m, base_c, caplog)
    assert not [k for k in lora if not k.startswith("lora_unet_")]
    assert not [k for k in lora if k.endswith((".diff", ".diff_b"))]
    assert torch.equal(_te_out(c), _te_out(base_c))
    with pytest.raises(pack.dynasyn.errors.DynASynError, match="Connect both base_clip and trained_clip"):
        bridge.save_lora(loras_dir, "half", base_m, tr_m, base_c, None, 4)
    free_comfy_memory()


def test_node_writes_to_models_loras_and_never_overwrites(trained, pack, loras_dir):
    import folder_paths

    base_m, base_c, tr_m, tr_c = trained
    node = pack.NODE_CLASS_MAPPINGS["DynASynSaveLoRA"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["DynASynSaveLoRA"] == "DynASyn Save LoRA"
    spec = node.INPUT_TYPES()
    for group in spec.values():
        assert all(opts[1].get("tooltip") for opts in group.values())
    out = node().save(base_m, tr_m, 4, "subjects", base_clip=base_c, trained_clip=tr_c)
    assert out["result"] == ("subjects.safetensors",) and "rank 4" in out["ui"]["text"][0]
    assert "subjects.safetensors" in folder_paths.get_filename_list("loras")  # what LoraLoader lists
    before = (loras_dir / "subjects.safetensors").read_bytes()
    again = node().save(base_m, tr_m, 4, "subjects", base_clip=base_c, trained_clip=tr_c)
    assert again["result"] == ("subjects_001.safetensors",)
    with pytest.raises(RuntimeError, match="already exists and will not be overwritten"):
        node().save(base_m, tr_m, 4, "subjects", if_exists="error")
    assert (loras_dir / "subjects.safetensors").read_bytes() == before
    with pytest.raises(RuntimeError, match="DynASyn: The LoRA rank must be a whole number"):
        node().save(base_m, tr_m, 0, "r0")
    with pytest.raises(RuntimeError, match="equals the base model"):
        node().save(base_m, base_m, 4, "same")
    assert sorted(p.name for p in loras_dir.iterdir()) == ["subjects.safetensors", "subjects_001.safetensors"]


def test_name_attacks_are_refused(trained, pack, loras_dir, tmp_path, monkeypatch):
    base_m, _, tr_m, _ = trained
    node = pack.NODE_CLASS_MAPPINGS["DynASynSaveLoRA"]
    outside = tmp_path / "outside"
    calls = []
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: calls.append(p) or real_exists(p))
    for name in ("../x", "../../outside/x", str(outside / "x"), "/tmp/x", "a/b", "..\\x"):
        result = node.IS_CHANGED(base_m, tr_m, 4, name)
        assert result != result  # NaN: no existence probe of any path
        with pytest.raises(RuntimeError, match="LoRA name .* was refused"):
            node().save(base_m, tr_m, 4, name)
    assert calls == []
    assert not outside.exists() and list(loras_dir.iterdir()) == []
    assert not [p for p in loras_dir.parent.iterdir() if p.name != "loras"]


def test_other_architecture_is_refused(trained, pack, loras_dir):
    import importlib

    from transformers import CLIPTokenizer

    base_m, base_c, _, _ = trained
    bridge = pack.nodes.bridge
    tok = CLIPTokenizer.from_pretrained(str(bridge.TOKENIZER_DIR), model_max_length=77, local_files_only=True)
    with torch.inference_mode(False):
        wider = importlib.import_module("dynasyn_pack.dynasyn.tiny").tiny_components(seed=0, tokenizer=tok, hidden_size=64)
        other_m, other_c, _ = bridge.tiny_native(wider)  # also SD 1.x-shaped, with another text width
    node = pack.NODE_CLASS_MAPPINGS["DynASynSaveLoRA"]()
    with pytest.raises(RuntimeError, match="trained MODEL and the base MODEL have different architectures.*Connect the base"):
        node.save(base_m, other_m, 4, "other")
    with pytest.raises(pack.dynasyn.lora.LoraError, match="trained CLIP and the base CLIP have different architectures"):
        bridge.save_lora(loras_dir, "other_clip", base_m, base_m, base_c, other_c, 4)
    assert list(loras_dir.iterdir()) == []


def test_reading_the_base_after_the_trained_model_ran_gives_the_base(trained, tiny_native, pack):
    """Clones share one module: after a KSampler used the trained clone, the module holds its weights in place. The
    bridge reads the base from ComfyUI's backup (this once made a LoRA of nothing, and would make Train start from
    the trained weights)."""
    comps = tiny_native[0]
    base_m, base_c, tr_m, _ = trained
    _unet_out(tr_m)
    unet = pack.nodes.bridge.native_unet_to_diffusers(base_m, "epsilon")
    for k, v in comps.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v.float()), k
    free_comfy_memory()
