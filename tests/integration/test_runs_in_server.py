"""Runs in the real server (tiny model): editing the Scene Prompt never re-executes Train, the same inputs load the
finished run instead of training, Load Run reproduces Train's samples bit-for-bit, Continue Training adds N steps,
and the run combo takes no path."""

import json
import uuid

import pytest
from safetensors.torch import load_file

from tests.integration.test_train_in_server import Listener, train_graph, write_inputs
from tests.support.comfy_server import execution_error

pytestmark = pytest.mark.slow


def scene_graph(run_name, seed, scene="[1] hugging [2] on a beach", **extra):
    """Train -> Scene Prompt -> CLIPTextEncode -> KSampler -> SaveImage + SaveLatent (each test its own seed: runs
    are found by their inputs, whatever their name)."""
    g = train_graph(run_name, seed=seed, **extra)
    g["13"] = {"class_type": "DynASynScenePrompt", "inputs": {"run": ["6", 4], "scene": scene}}
    g["7"]["inputs"]["text"] = ["13", 0]
    g["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": f"dynasyn_it/{run_name}"}}
    return g


def run_with(server, graph):
    listener = Listener(server)
    try:
        entry = server.run(graph, client_id=listener.client_id)
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    return entry, listener


def steps_of(listener, node="6"):
    return [e["step"] for e in listener.events("dynasyn.train") if e["node"] == node]


def cached(entry):
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def latent(server, entry, node="14"):
    f = entry["outputs"][node]["latents"][0]
    return load_file(server.base / "output" / f["subfolder"] / f["filename"])["latent_tensor"]


def listed_runs(server, node="DynASynLoadRun"):
    return server.get(f"/object_info/{node}")[node]["input"]["required"]["run"][0]


def test_editing_the_scene_prompt_does_not_retrain(server):
    write_inputs(server)
    g = scene_graph("it_scene", seed=21)
    first, listener = run_with(server, g)
    assert steps_of(listener) == [1, 2, 3, 4]
    assert first["outputs"]["13"]["text"] == ["embedding:it_scene_panda hugging embedding:it_scene_bowl on a beach"]
    g["13"]["inputs"]["scene"] = "[2] on top of [1] in the snow"
    second, listener = run_with(server, g)
    assert "6" in cached(second) and steps_of(listener) == []  # Train was not executed again
    assert second["outputs"]["13"]["text"] == ["embedding:it_scene_bowl on top of embedding:it_scene_panda in the snow"]
    assert not latent(server, first).equal(latent(server, second))  # the new scene was drawn
    g["13"]["inputs"]["scene"] = "[3] alone"
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error" and r"[1]…[2]" in execution_error(entry)


def test_the_same_inputs_load_the_finished_run(server):
    write_inputs(server)
    first, listener = run_with(server, scene_graph("it_reuse", seed=22))
    assert steps_of(listener) == [1, 2, 3, 4]
    # Train's inputs change (preview_every, run_name), not what decides the weights: it runs, and loads
    second, listener = run_with(server, scene_graph("it_reuse_again", seed=22, preview_every=1))
    assert "6" not in cached(second) and steps_of(listener) == []
    label = next(r for r in listed_runs(server) if r.startswith("it_reuse/"))
    assert f"loaded the finished run {label}" in server.log()
    assert second["outputs"]["6"]["text"] == first["outputs"]["6"]["text"]
    assert latent(server, first).equal(latent(server, second))
    forced, listener = run_with(server, scene_graph("it_reuse", seed=22, force_retrain=True))
    assert steps_of(listener) == [1, 2, 3, 4]
    assert latent(server, forced).equal(latent(server, first))  # same seed, same inputs: the same weights


def test_load_run_reproduces_the_trained_models_samples_bit_for_bit(server):
    write_inputs(server)
    trained, _ = run_with(server, scene_graph("it_load", seed=23))
    label = next(r for r in listed_runs(server) if r.startswith("it_load/"))
    g = {"1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
         "2": {"class_type": "DynASynLoadRun", "inputs": {"model": ["1", 0], "clip": ["1", 1], "run": label}},
         "13": {"class_type": "DynASynScenePrompt", "inputs": {"run": ["2", 3], "scene": "[1] hugging [2] on a beach"}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ["13", 0]}},
         "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
         "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
         "10": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["7", 0], "negative": ["8", 0],
                                                      "latent_image": ["9", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                      "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
         "14": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "dynasyn_it/it_load_run"}}}
    loaded, _ = run_with(server, g)
    assert latent(server, loaded).equal(latent(server, trained))
    assert "it_load_panda does not exist" not in server.log()
    # the combo value is untrusted: anything but a listed run is refused at validation
    for bad in ("../../user/__dynasyn/runs/" + label, label + "/..", "/etc/passwd", "it_load"):
        g["2"]["inputs"]["run"] = bad
        status, resp = server.post("/prompt", {"prompt": g, "client_id": uuid.uuid4().hex})
        assert status == 400 and "value_not_in_list" in json.dumps(resp), resp


def test_continue_training_adds_n_steps(server):
    write_inputs(server)
    run_with(server, scene_graph("it_more", seed=24))
    label = next(r for r in listed_runs(server, "DynASynContinueTraining") if r.startswith("it_more/"))
    g = {"1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
         "2": {"class_type": "DynASynContinueTraining", "inputs": {
             "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "run": label, "steps": 3, "save_as": "embeddings",
             "force_retrain": False, "preview_every": 0, "sample_every": 2, "save_every": 0}},
         "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 5], "filename_prefix": "dynasyn_it/it_more"}}}
    entry, listener = run_with(server, g)
    assert steps_of(listener, "2") == [5, 6, 7]
    assert entry["outputs"]["2"]["text"] == ["a photo of embedding:it_more_7_panda and embedding:it_more_7_bowl"]
    assert len(entry["outputs"]["3"]["images"]) == 2  # samples at step 6 and at the last step
    assert len(listener.frames) >= 2  # the samples reached the page as progress previews
    assert any(r.startswith("it_more/") and r != label for r in listed_runs(server))  # the continued run is listed
