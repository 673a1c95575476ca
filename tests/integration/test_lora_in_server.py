"""Train on the tiny model, save a LoRA, load it with the stock LoraLoader in the real server: it draws what the
trained model draws."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_train_in_server import train_graph, write_inputs
from tests.support.comfy_server import execution_error

pytestmark = pytest.mark.slow
PROMPT = "a photo of embedding:it_lora_panda and embedding:it_lora_bowl"
# 8-bit PNGs of the same seed: the fp16 factors move a pixel by at most a rounding step or two
MAX_PIXEL_STEPS = 2


def sample(prefix, model, clip, vae):
    """Nodes that draw PROMPT with (model, clip) and save it under output/<prefix>."""
    return {
        f"{prefix}p": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": PROMPT}},
        f"{prefix}n": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        f"{prefix}l": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        f"{prefix}k": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{prefix}p", 0], "negative": [f"{prefix}n", 0], "latent_image": [f"{prefix}l", 0],
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}d": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}k", 0], "vae": vae}},
        f"{prefix}s": {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}d", 0], "filename_prefix": f"it_lora/{prefix}"}},
    }


def image(server, entry, node):
    saved = entry["outputs"][node]["images"][0]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_trained_lora_loads_in_stock_lora_loader(server):
    write_inputs(server)
    g = train_graph("it_lora", phase1=2, phase2=3, phase2_lr=3e-3, save_as="embeddings")
    g = {k: v for k, v in g.items() if k in {"1", "2", "3", "4", "5", "6"}}
    g["20"] = {"class_type": "DynASynSaveLoRA", "inputs": {
        "base_model": ["1", 0], "trained_model": ["6", 0], "base_clip": ["1", 1], "trained_clip": ["6", 1],
        "rank": 4096, "name": "it_lora", "if_exists": "error", "biases_and_norms": True}}
    g.update(sample("t", ["6", 0], ["6", 1], ["1", 2]))
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    assert entry["outputs"]["20"]["text"][0].startswith("it_lora.safetensors: rank 4096")
    assert (server.base / "models" / "loras" / "it_lora.safetensors").exists()
    listed = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "it_lora.safetensors" in listed  # the file is in the stock loader's combo

    g2 = {"1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
          "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "it_lora.safetensors",
                                                        "strength_model": 1.0, "strength_clip": 1.0}}}
    g2.update(sample("l", ["2", 0], ["2", 1], ["1", 2]))
    g2.update(sample("b", ["1", 0], ["1", 1], ["1", 2]))  # the base without the LoRA, for scale
    log_before = len(server.log())
    entry2 = server.run(g2)
    assert entry2["status"]["status_str"] == "success", execution_error(entry2) or server.log()[-3000:]
    log = server.log()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    trained, with_lora, base = image(server, entry, "ts"), image(server, entry2, "ls"), image(server, entry2, "bs")
    assert np.abs(base - trained).mean() > 5  # training changed the picture: the comparison below can fail
    assert np.abs(with_lora - trained).max() <= MAX_PIXEL_STEPS


def test_lora_name_attacks_are_refused_in_the_server(server):
    for name in ("../x", "../../user/x", "/tmp/dynasyn_lora_x", "..\\x"):
        g = {"1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
             "2": {"class_type": "DynASynTinyModel", "inputs": {"seed": 1, "prediction": "epsilon"}},
             "3": {"class_type": "DynASynSaveLoRA", "inputs": {"base_model": ["1", 0], "trained_model": ["2", 0],
                                                              "rank": 4, "name": name, "if_exists": "new name",
                                                              "biases_and_norms": True}}}
        entry = server.run(g)
        assert entry["status"]["status_str"] == "error" and f"{name!r} was refused" in execution_error(entry)
    assert not list(server.base.rglob("x.safetensors")) and not list(server.base.parent.glob("x.safetensors"))
    assert not Path("/tmp/dynasyn_lora_x.safetensors").exists()
    assert not (server.base / "models" / "loras").exists() or not list((server.base / "models" / "loras").glob("*x*"))
