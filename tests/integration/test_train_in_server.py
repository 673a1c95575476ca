"""DynASyn Train in the real server: tiny native model -> train -> KSampler -> SaveImage, events, cancel + resume."""

import json
import threading
import time
import uuid

import pytest
from safetensors.torch import load_file

from tests.support.comfy_server import execution_error
from tests.support.scene import write_scene

pytestmark = pytest.mark.slow


def write_inputs(server):
    write_scene(server.base / "input")


def train_graph(run_name, phase1=2, phase2=2, **extra):
    return {
        "1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "scene.png"}},
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "mask_panda.png", "channel": "red"}},
        "4": {"class_type": "LoadImageMask", "inputs": {"image": "mask_bowl.png", "channel": "red"}},
        "5": {"class_type": "DynASynMaskBatch", "inputs": {"mask_1": ["3", 0], "mask_2": ["4", 0]}},
        "6": {"class_type": "DynASynTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "masks": ["5", 0],
            "class_nouns": "panda, bowl", "mode": "dynasyn", "phase1_steps": phase1, "phase2_steps": phase2,
            "phase1_lr": 5e-3, "phase2_lr": 1e-4, "lambda_md": 1.0, "lambda_m2a": 0.01, "lambda_ica": 0.01, "lambda_aug": 0.01,
            "seed": 0, "resolution": 64, "gradient_checkpointing": False, "mixed_precision": "no", "optimizer": "adamw",
            "fused_backward_step": False, "frozen_dtype": "auto", "train_text_encoder": True, "run_name": run_name, "save_as": "checkpoint", "resume": True, "preview_every": 2,
            **extra}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": ["6", 2]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": ""}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "positive": ["7", 0], "negative": ["8", 0],
                                                     "latent_image": ["9", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"dynasyn_it/{run_name}"}},
    }


class Listener:
    """Collects websocket messages of one client (custom 'dynasyn.train' events included)."""

    def __init__(self, server):
        import websocket

        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=5)
        self.messages, self.frames, self.stop = [], [], False  # frames: binary messages (previews)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import websocket

        while not self.stop:
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return
            if isinstance(msg, str) and msg:
                try:
                    self.messages.append(json.loads(msg))
                except ValueError:
                    pass
            elif isinstance(msg, bytes):
                self.frames.append(msg)

    def events(self, kind):
        return [m["data"] for m in self.messages if m.get("type") == kind]

    def close(self):
        self.stop = True
        self.ws.close()
        self.thread.join(timeout=10)


def test_train_then_sample_with_stock_nodes(server):
    write_inputs(server)
    listener = Listener(server)
    try:
        entry = server.run(train_graph("it_run"), client_id=listener.client_id)
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    prompt = entry["outputs"]["6"]["text"][0]
    assert prompt == "a photo of embedding:it_run_panda and embedding:it_run_bowl"
    saved = entry["outputs"]["12"]["images"]
    assert len(saved) == 1 and (server.base / "output" / saved[0]["subfolder"] / saved[0]["filename"]).exists()
    for noun in ("panda", "bowl"):
        emb = load_file(server.base / "models" / "embeddings" / f"it_run_{noun}.safetensors")["emb_params"]
        assert emb.shape == (1, 32)
    assert {"it_run_panda", "it_run_bowl"} <= set(server.get("/embeddings"))
    log = server.log()
    assert "it_run_panda does not exist" not in log and "shape mismatch" not in log  # the embeddings were used
    assert (server.base / "models" / "checkpoints" / "it_run.safetensors").exists()
    events = [e for e in listener.events("dynasyn.train") if e["node"] == "6"]
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert [e["phase"] for e in events] == [1, 1, 2, 2]
    assert set(events[-1]["terms"]) == {"md", "m2a", "ica"} and events[-1]["total"] == 4
    # L_ICA's frozen-model targets are made before step 1, and the page hears how far (the last one always)
    targets = [e for e in listener.events("dynasyn.targets") if e["node"] == "6"]
    assert targets and (targets[-1]["done"], targets[-1]["total"]) == (4, 4)
    assert any(m.get("type") == "progress" and m["data"].get("node") == "6" for m in listener.messages)


def test_cancel_saves_state_and_resume_continues(server):
    write_inputs(server)
    listener = Listener(server)
    try:
        status, resp = server.post("/prompt", {"prompt": train_graph("it_cancel", phase1=3, phase2=400),
                                               "client_id": listener.client_id})
        assert status == 200, resp
        assert resp["prompt_id"]
        deadline = time.time() + 300
        while time.time() < deadline and not [e for e in listener.events("dynasyn.train") if e["step"] >= 5]:
            time.sleep(0.2)
        server.post("/interrupt", {})
        while time.time() < deadline and not listener.events("execution_interrupted"):
            time.sleep(0.2)
        assert listener.events("execution_interrupted"), server.log()[-3000:]
    finally:
        listener.close()
    state = server.base / "user" / "__dynasyn" / "runs" / "it_cancel" / "state"  # not under the served output/
    assert not (server.base / "output" / "dynasyn" / "it_cancel").exists()
    meta = json.loads((state / "state.json").read_text())
    assert meta["step"] >= 5
    assert not (server.base / "models" / "embeddings" / "it_cancel_panda.safetensors").exists()
    resumed = Listener(server)
    try:
        entry = server.run(train_graph("it_cancel", phase1=3, phase2=meta["step"] + 2), client_id=resumed.client_id)
    finally:
        resumed.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    steps = [e["step"] for e in resumed.events("dynasyn.train") if e["node"] == "6"]
    assert steps == list(range(meta["step"] + 1, 3 + meta["step"] + 2 + 1))  # continues where the cancel stopped
    assert not state.exists()  # a finished run removes its resumable state


def test_bad_masks_give_a_clear_error(server):
    write_inputs(server)
    g = train_graph("it_bad")
    g["5"]["inputs"] = {"mask_1": ["3", 0], "mask_2": ["3", 0]}  # the same mask twice
    entry = server.run(g)
    msg = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and "cover nearly the same pixels" in msg


def test_dreambooth_draws_its_class_images_once_and_keeps_them_with_the_run(server):
    """Prior preservation from the node: class images from the base model in user/__dynasyn/runs/<run>/class_images,
    the 'prior' term in the events, one subject per step."""
    write_inputs(server)
    listener = Listener(server)
    try:
        entry = server.run(train_graph("it_prior", phase1=1, phase2=1, mode="dreambooth", num_class_images=2,
                                       class_prompt="a photo of a dog"), client_id=listener.client_id)
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    folder = server.base / "user" / "__dynasyn" / "runs" / "it_prior" / "class_images"
    assert sorted(p.name for p in folder.glob("*.png")) == ["class_0000.png", "class_0001.png"]
    events = [e for e in listener.events("dynasyn.train") if e["node"] == "6"]
    assert [e["phase"] for e in events] == [2, 2] and all(set(e["terms"]) == {"md", "prior"} for e in events)
    assert "drawing 2 class images of 'a photo of a dog'" in server.log()
