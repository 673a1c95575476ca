"""The augmentation stage in the real server: image -> SAM masks -> describe -> prompts -> augment -> dataset
-> SaveImage; the dataset folder loads back and trains (L_AUG) in a second workflow."""

import json

import pytest

from tests.support.comfy_server import execution_error
from tests.support.scene import write_scene

pytestmark = pytest.mark.slow

SAM_PROMPTS = json.dumps([{"box": [6, 6, 30, 30], "points": [[18, 18]]}, {"box": [28, 34, 60, 60]}])


def augment_graph(name, count=2):
    return {
        "1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "scene.png"}},
        "3": {"class_type": "DynASynSAMLoader", "inputs": {"sam_name": "tiny (random test-size SAM, for trying graphs)"}},
        "4": {"class_type": "DynASynSAMMasks", "inputs": {"sam": ["3", 0], "image": ["2", 0], "subject_prompts": SAM_PROMPTS,
                                                        "clip_to_box": True}},
        "5": {"class_type": "DynASynDescribeSubjects", "inputs": {
            "image": ["2", 0], "masks": ["4", 0], "class_nouns": "panda, bowl", "mode": "offline", "model": "llava",
            "endpoint": "http://127.0.0.1:9/v1", "timeout": 5.0, "seed": 0, "phrases": "red panda toy\n"}},
        "6": {"class_type": "DynASynAugmentPrompts", "inputs": {
            "descriptions": ["5", 0], "class_nouns": "panda, bowl", "count": count, "mode": "offline", "model": "llama3.1",
            "endpoint": "http://127.0.0.1:9/v1", "timeout": 5.0, "seed": 0}},
        "7": {"class_type": "DynASynAugment", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "masks": ["4", 0], "prompts": ["6", 0],
            "size": 64, "draft_steps": 3, "inpaint_steps": 3, "gsa_strength": 0.7, "gsa_steps": 10, "gsa_sampler": "ddim",
            "paper_exact": False, "guidance": 5.0, "seed": 0, "draft_sampler": "euler", "draft_scheduler": "normal",
            "draft_batch": 2, "sam": ["3", 0]}},
        "8": {"class_type": "DynASynSaveDataset", "inputs": {"dataset": ["7", 0], "name": name}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 1], "filename_prefix": f"dynasyn_it/{name}"}},
    }


def test_augmentation_chain_then_dataset_round_trip_and_training(server):
    write_scene(server.base / "input")
    entry = server.run(augment_graph("it_ds"))
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    report = entry["outputs"]["7"]["text"][0]
    assert "from 2 prompts" in report
    made = int(report.split()[0])
    assert made >= 1, report  # the tiny SAM finds both subjects in a draft: a run that makes nothing is a bug
    # ComfyUI's sampler on the native MODEL: 2 drafts x 3 steps, then per pair <= 3 inpaint + 7 GSA steps
    assert 6 + 7 * made <= int(report.split("(")[1].split()[0]) <= 6 + 10 * made
    folder = server.base / "user" / "__dynasyn" / "datasets" / "it_ds"  # read back later: never under output/
    assert entry["outputs"]["8"]["text"][0] == str(folder)
    index = json.loads((folder / "dataset.json").read_text())
    assert len(index["pairs"]) == made and made + int(report.split("; ")[1].split()[0]) == 2
    saved = entry["outputs"]["9"]["images"]
    assert len(saved) == made
    assert entry["outputs"]["5"]["text"][0] == "red panda toy\nbowl"  # offline: the user's phrase, else the class noun

    g = augment_graph("it_ds")
    g["7"]["inputs"]["seed"] = 1  # another dataset under the same name: a new folder, the first is kept
    again = server.run(g)
    assert again["status"]["status_str"] == "success", execution_error(again)
    assert again["outputs"]["8"]["text"][0].endswith("it_ds_001") and (folder / "dataset.json").exists()

    from tests.integration.test_train_in_server import train_graph
    g = train_graph("it_aug", phase1=1, phase2=1)
    g["20"] = {"class_type": "DynASynLoadDataset", "inputs": {"folder": "it_ds"}}
    g["6"]["inputs"]["dataset"] = ["20", 0]
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]


def test_augment_bad_input_is_a_clear_error(server):
    write_scene(server.base / "input")
    g = augment_graph("it_bad")
    g["4"]["inputs"]["subject_prompts"] = json.dumps([{"box": [6, 6, 30, 30]}])  # one mask for two class nouns
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "1 masks for 2 class nouns" in execution_error(entry)
    g = augment_graph("it_bad2")
    g["5"]["inputs"]["mode"] = "vlm"  # nothing listens on port 9
    entry = server.run(g)
    assert "Cannot reach http://127.0.0.1:9/v1" in execution_error(entry)
    g = augment_graph("it_bad3")
    g["10"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}}
    g["5"]["inputs"]["image"] = ["10", 0]  # a batch where the ONE reference picture belongs
    entry = server.run(g)
    assert "must be ONE image, not a batch of 2" in execution_error(entry)


def test_gsa_node_starts_at_t700_with_comfyui_sampler(server):
    write_scene(server.base / "input")
    g = {
        "1": {"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "scene.png"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a panda jumping into a bowl"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "DynASynGSA", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "vae": ["1", 2], "image": ["2", 0], "strength": 0.7, "steps": 30,
                                                   "sampler_name": "euler", "cfg": 5.0, "seed": 0, "paper_exact": False}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "dynasyn_it/gsa"}},
    }
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    assert entry["outputs"]["5"]["text"][0] == "start t = 699 of 1000, 21 euler steps"
    assert len(entry["outputs"]["6"]["images"]) == 1


def test_no_node_takes_an_api_key(server):
    """Keys come from the environment or a key file: no input of any pack node could carry one into a workflow."""
    info = server.get("/object_info")
    for name, node in info.items():
        if not name.startswith("DynASyn") or name.startswith("DynASynTest"):  # the tests' own helper pack
            continue
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert not [k for k in inputs if "key" in k.lower() or "token" in k.lower() or "secret" in k.lower()], name
    assert "endpoint" in info["DynASynDescribeSubjects"]["input"]["required"]


def test_cancel_keeps_the_pairs_made_so_far(server):
    write_scene(server.base / "input")
    g = augment_graph("it_cancel", count=8)
    g["7"]["inputs"].update(draft_batch=1, seed=5)
    interrupted = []

    def on_message(msg):
        # one prompt is <= 3 draft + 3 inpaint + 7 GSA evaluations: past 30, at least two prompts are done
        if msg.get("type") == "progress" and msg["data"].get("node") == "7" and msg["data"]["value"] >= 30 and not interrupted:
            interrupted.append(msg["data"]["value"])
            server.post("/interrupt", {})

    entry = server.run(g, on_message=on_message)
    assert interrupted and entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    index = json.loads((server.base / "user" / "__dynasyn" / "datasets" / "cancelled" / "dataset.json").read_text())
    assert 1 <= len(index["pairs"]) < 8
    assert "augmentation cancelled" in server.log()


def test_augment_with_a_zero_shot_detector(server):
    from tests.support.tiny_detector import write_tiny_owlvit

    write_scene(server.base / "input")
    write_tiny_owlvit(server.base / "models" / "grounding" / "owlvit-tiny")
    g = augment_graph("it_detector")
    g["11"] = {"class_type": "DynASynDetectorLoader", "inputs": {"detector_name": "owlvit-tiny", "threshold": 0.0}}
    g["7"]["inputs"]["detector"] = ["11", 0]
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    assert "from 2 prompts" in entry["outputs"]["7"]["text"][0]
    g["11"]["inputs"]["detector_name"] = "grounding-dino-tiny"  # not in models/grounding: refused before running
    status, resp = server.post("/prompt", {"prompt": g})
    assert status == 400 and "grounding-dino-tiny" in json.dumps(resp)
