"""Runs in the real server (tiny model): editing the Scene Prompt never re-executes Train, the same inputs load the
finished run instead of training, Load Run reproduces Train's samples bit-for-bit, Continue Training adds N steps,
the run combo takes no path, and sample_every's pictures reach the page over the websocket while Train trains."""

import io
import json
import struct
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image, ImageOps
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


class Timeline:
    """Everything one websocket client receives, in arrival order: ("json", message) or ("frame", (metadata, PIL
    image)). It announces the page's feature flag, so previews come as the page gets them (with their node id)."""

    def __init__(self, server):
        import websocket

        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=5)
        self.ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        self.items, self.stop = [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not any(k == "json" and m.get("type") == "feature_flags" for k, m in self.items):
            assert time.time() < deadline, "the server never answered the feature flags"
            time.sleep(0.05)

    def _run(self):
        import websocket

        while not self.stop:
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # noqa: BLE001 - closed
                return
            if isinstance(msg, str) and msg:
                self.items.append(("json", json.loads(msg)))
            elif isinstance(msg, bytes):
                self.items.append(("frame", _preview(msg)))

    def close(self):
        self.stop = True
        self.ws.close()
        self.thread.join(timeout=10)


PREVIEW_IMAGE_WITH_METADATA = 4  # ComfyUI's BinaryEventTypes


def _preview(frame: bytes):
    """(metadata, image) of a binary preview frame: event type, metadata length, metadata JSON, PNG/JPEG bytes."""
    event, length = struct.unpack(">II", frame[:8])
    if event != PREVIEW_IMAGE_WITH_METADATA:
        return {"event": event}, None
    return json.loads(frame[8:8 + length]), Image.open(io.BytesIO(frame[8 + length:])).convert("RGB")


def test_sample_every_previews_arrive_over_the_websocket_while_training(server):
    """sample_every (no loss-curve previews): each sample reaches the page as a binary preview frame of the Train
    node right after its step's event and before the next step's, so while training, not at the end; and each
    frame is the picture the node outputs for that step (as the server scales previews to 512 px)."""
    write_inputs(server)
    g = train_graph("it_watch", phase1=3, phase2=3, seed=25, preview_every=0, sample_every=2, force_retrain=True)
    g["15"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 5], "filename_prefix": "dynasyn_it/it_watch"}}
    timeline = Timeline(server)
    try:
        entry = server.run(g, client_id=timeline.client_id)
    finally:
        timeline.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    items = timeline.items
    step_at = {m["data"]["step"]: i for i, (k, m) in enumerate(items)
               if k == "json" and m["type"] == "dynasyn.train" and m["data"]["node"] == "6"}
    assert sorted(step_at) == [1, 2, 3, 4, 5, 6]
    frames = [(i, image) for i, (k, v) in enumerate(items) if k == "frame" for meta, image in [v]
              if meta.get("node_id") == "6" and meta.get("image_type") == "image/png"]
    assert len(frames) == 3, [v[0] for k, v in items if k == "frame"]  # steps 2, 4 and 6
    executed = next(i for i, (k, m) in enumerate(items) if k == "json" and m["type"] == "executed" and m["data"]["node"] == "6")
    for (i, _), step in zip(frames, (2, 4, 6)):
        assert step_at[step] < i < step_at.get(step + 1, executed), (step, i, step_at)
    saved = entry["outputs"]["15"]["images"]
    assert len(saved) == 3
    for (_, preview), s in zip(frames, saved):
        picture = Image.open(server.base / "output" / s["subfolder"] / s["filename"]).convert("RGB")
        assert picture.size == (64, 64) and preview.size == (512, 512)
        scaled = ImageOps.contain(picture, (512, 512), Image.Resampling.BILINEAR)  # what the server does to previews
        assert np.abs(np.asarray(preview, dtype=int) - np.asarray(scaled, dtype=int)).max() <= 1
