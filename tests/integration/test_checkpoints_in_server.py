"""Exported checkpoints and diffusers folders, loaded by the running server's own loader nodes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.comfy_server import execution_error

pytestmark = [pytest.mark.slow, pytest.mark.realsize]  # every test here writes real-size checkpoints
ROOT = Path(__file__).resolve().parents[2]


def make(family, server, name, tmp_path, diffusers=False):
    server.free()
    expected = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "tests.support.make_changed_checkpoint", family,
           str(server.base / "models" / "checkpoints"), name, str(expected)]
    if diffusers:
        cmd += ["--diffusers", str(server.base / "models" / "diffusers" / name)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(expected.read_text())


def digests(server, loader_node: dict, keys, text_from=None) -> dict:
    graph = {"1": loader_node, "2": {"class_type": "DynASynTestWeightDigest",
                                     "inputs": {"model": ["1", 0], "clip": ["1", 1], "keys": json.dumps(list(keys))}}}
    if text_from is not None:
        graph["2"]["inputs"]["text"] = ["1", text_from]
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    return json.loads(entry["outputs"]["2"]["text"][0])


@pytest.fixture(scope="module")
def changed_sd15(server, tmp_path_factory):
    """One changed SD 1.5 export shared by the tests that need it (made once, whichever runs first)."""
    name = "changed_sd15"
    expected = make("sd15", server, name, tmp_path_factory.mktemp("sd15"))
    yield name, expected
    (server.base / "models" / "checkpoints" / f"{name}.safetensors").unlink(missing_ok=True)


def check_loads_with_checkpoint_loader_simple(server, name, expected, family):
    got = digests(server, {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{name}.safetensors"}},
                  expected)
    for key, want in expected.items():
        assert got[key] == want, key
    assert got["prediction"] == ("v_prediction" if family == "sd21v" else "epsilon")


def test_exported_sd15_checkpoint_loads_with_checkpoint_loader_simple(server, changed_sd15):
    check_loads_with_checkpoint_loader_simple(server, *changed_sd15, "sd15")


def test_exported_sd21v_checkpoint_loads_with_checkpoint_loader_simple(server, tmp_path):
    name = "changed_sd21v"
    check_loads_with_checkpoint_loader_simple(server, name, make("sd21v", server, name, tmp_path), "sd21v")
    (server.base / "models" / "checkpoints" / f"{name}.safetensors").unlink()


def test_save_checkpoint_node_never_overwrites(server, changed_sd15):
    ckpt = f"{changed_sd15[0]}.safetensors"
    def graph(if_exists):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                "2": {"class_type": "DynASynSaveCheckpoint", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                                        "name": "node_saved", "if_exists": if_exists}}}
    first = server.run(graph("error"))
    assert first["status"]["status_str"] == "success", execution_error(first)
    assert first["outputs"]["2"]["text"][0].endswith("node_saved.safetensors")
    before = (server.base / "models" / "checkpoints" / "node_saved.safetensors").stat()
    second = server.run(graph("error"))
    msg = execution_error(second)
    assert second["status"]["status_str"] == "error" and "already exists" in msg and "will not be overwritten" in msg
    third = server.run(graph("new name"))
    assert third["status"]["status_str"] == "success"
    assert third["outputs"]["2"]["text"][0].endswith("node_saved_001.safetensors")
    after = (server.base / "models" / "checkpoints" / "node_saved.safetensors").stat()
    assert (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
    bad = graph("error")
    bad["2"]["inputs"]["name"] = "../escape"
    msg = execution_error(server.run(bad))
    assert "'../escape' was refused" in msg
    assert not list((server.base / "models").glob("escape*"))
    for p in (server.base / "models" / "checkpoints").glob("node_saved*"):
        p.unlink()


def test_diffusers_folder_loader_keeps_weights_v_prediction_and_placeholders(server, tmp_path):
    name = "changed_sd21v_diffusers"
    expected = make("sd21v", server, name, tmp_path, diffusers=True)
    placeholder = expected.pop("placeholder")
    clip_keys = [k for k in expected if k.startswith("clip.")]
    for k in clip_keys:  # the loader builds its CLIP fresh; compared through its own storage below
        expected.pop(k)
    got = digests(server, {"class_type": "DynASynDiffusersLoader", "inputs": {"model_path": name, "export_placeholders": True}},
                  expected, text_from=3)
    for key, want in expected.items():
        assert got[key] == want, key
    assert got["prediction"] == "v_prediction"
    assert got["text"] == f"embedding:{name}_asset0"
    from safetensors.torch import load_file
    emb = load_file(server.base / "models" / "embeddings" / f"{name}_asset0.safetensors")["emb_params"]
    assert emb.shape == (1, 1024) and abs(emb[0, 0].item() - placeholder[0]) < 1e-7
    server.free()
    shutil.rmtree(server.base / "models" / "diffusers" / name)
