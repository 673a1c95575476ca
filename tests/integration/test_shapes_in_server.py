"""The Shapes World model in a real ComfyUI server with stock CLIPTextEncode / KSampler / VAEDecode, and an
``embedding:<name>`` file of its width: the pictures show what the prompt says (read back by the scorer)."""

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from tests.support.comfy_server import execution_error

pytestmark = pytest.mark.slow
PROMPT = "a red ball on the grass"


def graph(text, batch=4):
    return {
        "1": {"class_type": "DynASynShapesWorldModel", "inputs": {}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": batch}},  # 16x16 latents
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": 3, "steps": 20, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "shapes_it/out"}},
    }


def saved_pictures(server, entry):
    return [np.asarray(Image.open(server.base / "output" / im["subfolder"] / im["filename"]).convert("RGB"))
            for im in entry["outputs"]["7"]["images"]]


def test_stock_nodes_sample_the_prompt(server):
    from dynasyn.shapes import scorer
    from dynasyn.shapes.model import load_shapes_components

    entry = server.run(graph(PROMPT))
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    pics = saved_pictures(server, entry)
    assert len(pics) == 4 and all(p.shape == (64, 64, 3) for p in pics)
    hits = [scorer.score_caption(p, PROMPT)["objects"][0]["color"] for p in pics]
    assert sum(hits) >= 3, hits  # a red object in the pictures

    # embedding:<name> with the text encoder's own vector for "red" stands in for the word
    comps = load_shapes_components()
    red = comps.tokenizer("red").input_ids[1]
    vec = comps.text_encoder.get_input_embeddings().weight[red].detach().float().reshape(1, -1).contiguous()
    save_file({"emb_params": vec}, str(server.base / "models" / "embeddings" / "shapes_red.safetensors"))
    entry = server.run(graph("a embedding:shapes_red ball on the grass"))
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    assert "shapes_red does not exist" not in server.log() and "shape mismatch" not in server.log()
    emb_pics = saved_pictures(server, entry)
    assert all(np.array_equal(a, b) for a, b in zip(pics, emb_pics))  # same conditioning -> same pictures
