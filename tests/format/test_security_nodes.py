"""The pack's nodes against hostile widget values, in-process with ComfyUI's own folder_paths (no server).

Each test performs an attack a shared workflow could make and asserts it fails; the library-level
versions are in tests/unit/test_security.py.
"""

import json
import os

import pytest
import torch

SECRET = "sk-operator-secret-0123456789"


@pytest.fixture()
def comfy_dirs(pack, tmp_path, monkeypatch):
    """ComfyUI's output / user / temp / model folders pointed at a fresh temporary base."""
    import folder_paths

    base = tmp_path / "comfy"
    dirs = {k: base / k for k in ("output", "user", "temp", "input", "models/diffusers", "models/checkpoints")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for setter, key in (("set_output_directory", "output"), ("set_user_directory", "user"),
                        ("set_temp_directory", "temp"), ("set_input_directory", "input")):
        old = getattr(folder_paths, "get_" + setter[4:])()
        getattr(folder_paths, setter)(str(dirs[key]))
        monkeypatch.setattr(folder_paths, "_dynasyn_restore_" + key, old, raising=False)
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("diffusers", "checkpoints")}
    folder_paths.folder_names_and_paths["diffusers"] = ([str(dirs["models/diffusers"])], {"folder"})
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(dirs["models/checkpoints"])], {".safetensors"})
    yield dirs
    folder_paths.folder_names_and_paths.update(saved)
    for setter, key in (("set_output_directory", "output"), ("set_user_directory", "user"),
                        ("set_temp_directory", "temp"), ("set_input_directory", "input")):
        getattr(folder_paths, setter)(getattr(folder_paths, "_dynasyn_restore_" + key))


def _pairs():
    from dynasyn_pack.dynasyn.dataset import AugmentedPair

    g = torch.Generator().manual_seed(0)
    return [AugmentedPair(torch.rand(8, 8, 3, generator=g), "a panda and a bowl", [0, 1],
                          (torch.rand(2, 8, 8, generator=g) > 0.5).float())]


# ------------------------------------------------------------------ 1. the Describe node sends no key to a workflow's host
def test_describe_node_sends_no_key_to_the_endpoint_a_workflow_names(pack, comfy_dirs, monkeypatch):
    from tests.support.openai_server import FakeOpenAI

    for var in ("OPENAI_API_KEY", "DYNASYN_API_HOSTS", "DYNASYN_API_BASE", "DYNASYN_ENDPOINT_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DYNASYN_API_KEY", SECRET)
    node = pack.NODE_CLASS_MAPPINGS["DynASynDescribeSubjects"]()
    image = torch.rand(1, 32, 32, 3)
    masks = torch.zeros(1, 32, 32)
    masks[0, 4:20, 4:20] = 1
    with FakeOpenAI(host="127.0.0.2") as attacker:
        out = node.describe(image, masks, "panda", "vlm", "llava", attacker.base_url, 10.0, 0)
        assert out["result"][0] == "red panda"
        (req,) = attacker.requests
    assert "authorization" not in req["headers"] and SECRET not in repr(req)


# ------------------------------------------------------------------ 2. the state is not under output/
def test_training_state_lives_outside_every_served_folder(pack, comfy_dirs):
    train_node = pack.nodes.train_node
    state = train_node._state_dir("myrun")
    assert state == str(comfy_dirs["user"] / "__dynasyn" / "runs" / "myrun" / "state")
    for served in ("output", "temp", "input"):
        assert not state.startswith(str(comfy_dirs[served]))
    from dynasyn_pack.dynasyn.errors import DynASynError

    for bad in ("../../output/x", "/tmp/x", "a/b", ".."):
        with pytest.raises(DynASynError, match="run name"):
            train_node._state_dir(bad)


def test_train_events_go_to_the_queueing_client_only(pack, monkeypatch):
    import sys
    import types

    sent = []

    class FakeServer:
        client_id = "client-a"

        def send_sync(self, event, data, sid=None):
            sent.append((event, data, sid))

    # ComfyUI's server module cannot be imported in-process; the node only needs PromptServer.instance
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": FakeServer()})
    monkeypatch.setitem(sys.modules, "server", fake)
    pack.nodes.train_node._send("dynasyn.train", {"step": 1})
    assert sent == [("dynasyn.train", {"step": 1}, "client-a")]
    FakeServer.client_id = None  # a prompt queued without a client: nothing is broadcast
    pack.nodes.train_node._send("dynasyn.train", {"step": 2})
    assert len(sent) == 1


# ------------------------------------------------------------------ 3. Load Dataset: names from a list, nothing else
def test_save_then_load_dataset_by_name_in_the_private_folder(pack, comfy_dirs):
    save = pack.NODE_CLASS_MAPPINGS["DynASynSaveDataset"]()
    load = pack.NODE_CLASS_MAPPINGS["DynASynLoadDataset"]
    folder = save.save(_pairs(), "mine")["result"][0]
    assert folder == str(comfy_dirs["user"] / "__dynasyn" / "datasets" / "mine")
    assert not (comfy_dirs["output"] / "dynasyn").exists()
    assert load.INPUT_TYPES()["required"]["folder"][0] == ["mine"]
    pairs = load().load("mine")["result"][0]
    assert len(pairs) == 1 and pairs[0].class_prompt == "a panda and a bowl"


def test_load_dataset_refuses_paths_alike_whether_they_exist_or_not(pack, comfy_dirs, tmp_path):
    save = pack.NODE_CLASS_MAPPINGS["DynASynSaveDataset"]()
    load = pack.NODE_CLASS_MAPPINGS["DynASynLoadDataset"]
    real = pack.dynasyn.dataset.save_dataset(_pairs(), tmp_path / "elsewhere" / "ds")  # a valid dataset outside
    save.save(_pairs(), "mine")
    messages = []
    for name in (str(real), str(tmp_path / "nothing_here"), "../../../elsewhere/ds", "..", "mine/../mine",
                 "/etc", "/no/such/path"):
        assert load.IS_CHANGED(name) != load.IS_CHANGED(name)  # NaN: never a timestamp of a path outside
        with pytest.raises(RuntimeError) as err:
            load().load(name)
        messages.append(str(err.value).replace(name[:80], "<name>"))
        assert "not a dataset name" in messages[-1]
    assert len(set(messages)) == 1  # the same words for an existing and a missing path: no existence oracle
    with pytest.raises(RuntimeError, match="no dataset named 'other'"):
        load().load("other")


def test_symlinked_and_output_datasets_are_not_listed_or_loaded(pack, comfy_dirs, tmp_path):
    from dynasyn_pack.dynasyn.dataset import save_dataset

    load = pack.NODE_CLASS_MAPPINGS["DynASynLoadDataset"]
    root = comfy_dirs["user"] / "__dynasyn" / "datasets"
    outside = save_dataset(_pairs(), tmp_path / "outside_ds")
    save_dataset(_pairs(), comfy_dirs["output"] / "dynasyn" / "datasets" / "uploaded")  # where /upload/image writes
    root.mkdir(parents=True, exist_ok=True)
    (root / "linked").symlink_to(outside)
    assert load.INPUT_TYPES()["required"]["folder"][0] == ["dynasyn_dataset"]  # nothing listed: the default name
    for name in ("linked", "uploaded"):
        with pytest.raises(RuntimeError, match="no dataset named"):
            load().load(name)
        assert load.IS_CHANGED(name) != load.IS_CHANGED(name)
    # a planted entry pointing outside is refused even inside a listed dataset
    mine = save_dataset(_pairs(), root / "mine")
    index = json.loads((mine / "dataset.json").read_text())
    index["pairs"][0]["image"] = str(outside / "0000.png")
    (mine / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(RuntimeError, match="not a plain .png file name"):
        load().load("mine")


# ------------------------------------------------------------------ 6. names validated before any filesystem call
def test_save_checkpoint_is_changed_probes_no_path_outside(pack, comfy_dirs, tmp_path, monkeypatch):
    node = pack.NODE_CLASS_MAPPINGS["DynASynSaveCheckpoint"]
    probe = tmp_path / "exists.safetensors"
    probe.write_bytes(b"x")
    calls = []
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: calls.append(p) or real_exists(p))
    rel = os.path.relpath(tmp_path / "exists", comfy_dirs["models/checkpoints"])
    for name in (rel, str(tmp_path / "exists"), "../x"):
        result = node.IS_CHANGED(None, None, None, name)
        assert result != result  # NaN, the same answer whether the file exists or not
    assert calls == []
    assert node.IS_CHANGED(None, None, None, "fine_name") is False


def test_diffusers_loader_takes_listed_folders_only(pack, comfy_dirs, tmp_path):
    loaders = pack.nodes.loaders
    base = comfy_dirs["models/diffusers"]
    (base / "good" / "unet").mkdir(parents=True)
    (base / "good" / "model_index.json").write_text("{}")
    planted = comfy_dirs["output"] / "planted"  # what /upload/image?type=output&subfolder=planted could write
    planted.mkdir()
    (planted / "model_index.json").write_text("{}")
    (base / "loop").symlink_to(base)  # a cycle: the scan stays bounded
    assert loaders._diffusers_folders() == ["good"]
    assert loaders._resolve("good") == str(base / "good")
    for name in ("../../output/planted", str(planted), "good/..", "good/../good", "nope"):
        with pytest.raises(Exception, match="not a diffusers folder of models/diffusers"):
            loaders._resolve(name)
    (base / "later").mkdir()
    (base / "later" / "model_index.json").write_text("{}")
    assert loaders._diffusers_folders() == ["good", "later"]  # the cache sees new folders


def test_diffusers_scan_is_bounded(pack, comfy_dirs, monkeypatch):
    loaders = pack.nodes.loaders
    base = comfy_dirs["models/diffusers"]
    deep = base.joinpath(*[f"d{i}" for i in range(8)])
    deep.mkdir(parents=True)
    (deep / "model_index.json").write_text("{}")
    for i in range(30):
        (base / f"wide{i:02d}").mkdir()
    monkeypatch.setattr(loaders, "MAX_SCAN_DIRS", 10)
    loaders._scan_cache.clear()
    found, looked = loaders._scan(str(base))
    assert found == [] and len(looked) <= 10
