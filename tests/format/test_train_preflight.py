"""The Train node applies the memory preset and refuses, before any work, a run that cannot fit the free VRAM."""

import importlib
from types import SimpleNamespace

import pytest
import torch


def real_size_sd15_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return (SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)), SimpleNamespace(cond_stage_model=te),
            SimpleNamespace(first_stage_model=vae))


@pytest.fixture
def node(pack, monkeypatch):
    mod = importlib.import_module("dynasyn_pack.nodes.train_node")
    monkeypatch.setattr(mod.mm, "get_torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(mod.bridge, "native_to_components", lambda *a, **k: pytest.fail("work started before the check"))
    monkeypatch.setattr(mod.bridge, "model_family", lambda model: "sd15")  # the stand-in MODEL below is SD 1.5-sized
    monkeypatch.setattr(mod.bridge, "native_fingerprint", lambda *a, **k: {"unet": "meta", "clip": "meta", "vae": "meta"})
    return mod


def free(gib):
    def get_free_memory(dev=None, torch_free_too=False):
        b = int(gib * 2 ** 30)
        return (b, b) if torch_free_too else b
    return get_free_memory


def widgets(node_mod):
    req = node_mod.DynASynTrain.INPUT_TYPES()["required"]
    return {k: v[1]["default"] for k, v in req.items() if len(v) > 1 and "default" in v[1]}


def test_auto_preset_follows_the_free_memory(node, monkeypatch):
    from dynasyn_pack.dynasyn.train import TrainConfig

    model, clip, vae = real_size_sd15_on_meta()
    monkeypatch.setattr(node.mm, "get_free_memory", free(11))
    cfg = node._preflight(TrainConfig(), "auto", model, clip, vae, with_aug=False)
    assert cfg.gradient_checkpointing and cfg.fused_backward_step and cfg.optimizer == "adafactor"
    monkeypatch.setattr(node.mm, "get_free_memory", free(23))
    assert node._preflight(TrainConfig(), "auto", model, clip, vae, with_aug=False).optimizer == "adamw"


def test_train_node_refuses_before_any_work_naming_what_fits(node, monkeypatch):
    model, clip, vae = real_size_sd15_on_meta()
    monkeypatch.setattr(node.mm, "get_free_memory", free(11))
    kw = widgets(node)
    kw.update(model=model, clip=clip, vae=vae, image=torch.rand(1, 64, 64, 3), masks=torch.ones(2, 64, 64),
              class_nouns="panda, bowl", memory_preset="24 GB (paper)")
    with pytest.raises(Exception, match=r"needs about .* GiB .* What would fit: memory_preset '12 GB'"):
        node.DynASynTrain().train(**kw)
    monkeypatch.setattr(node.mm, "get_free_memory", free(3))
    kw["memory_preset"] = "auto"
    with pytest.raises(Exception, match="No memory preset fits"):
        node.DynASynTrain().train(**kw)
    assert "memory_preset" in node.DynASynTrain.INPUT_TYPES()["optional"]
