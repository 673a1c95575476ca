"""The shipped templates through the real server's HTTP API (as the page's Queue sends it): none needs what another
workflow writes; the Shapes World one, as shipped, runs the whole pipeline (Example Scene -> augment -> Train ->
sample) with nothing to download or upload; the train one builds its dataset with the stage nodes (tiny model)."""

import json
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from demo.__main__ import substitute
from demo.server import ROOT
from demo.workflow import nodes_of, ui_to_api
from tests.support.comfy_server import execution_error

pytestmark = pytest.mark.slow


def test_shapes_world_template_runs_as_shipped(server):
    workflow = json.loads((ROOT / "example_workflows" / "dynasyn_shapes_world.json").read_text())
    prompt = ui_to_api(workflow, server.get("/object_info"))
    assert {v["class_type"] for v in prompt.values()} >= {"DynASynShapesWorldModel", "DynASynExampleScene",
                                                          "DynASynAugment", "DynASynTrain", "KSampler"}
    started = time.time()
    entry = server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    print(f"dynasyn_shapes_world.json: {time.time() - started:.0f} s")

    scene = nodes_of(prompt, "DynASynScenePrompt")[0]  # the scene, written with the run's words after Train
    scene_prompt = entry["outputs"][scene]["text"][0]
    names = scene_prompt.replace("embedding:", " ").split()
    embeddings = [n for n in names if n.startswith("shapes_world")]
    assert len(embeddings) == 2 and " on top of " in scene_prompt, scene_prompt
    for name in embeddings:
        vec = next(iter(load_file(server.base / "models" / "embeddings" / f"{name}.safetensors").values()))
        assert vec.shape[-1] == 64  # the Shapes World text width
    augment = nodes_of(prompt, "DynASynAugment")[0]
    assert "dynasyn_gallery" in entry["outputs"][augment]  # augmented pairs were made
    samples = [k for k in nodes_of(prompt, "SaveImage") if prompt[k]["inputs"]["filename_prefix"] == "dynasyn/shapes_world"]
    saved = entry["outputs"][samples[0]]["images"]
    pictures = [np.asarray(Image.open(server.base / "output" / s["subfolder"] / s["filename"]).convert("RGB")) for s in saved]
    assert len(pictures) == 4 and all(p.shape == (64, 64, 3) and p.std() > 5 for p in pictures)


TEMPLATES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
# nodes that read what another workflow or an upload left behind: a shipped workflow must not need one to run
READS_SAVED = {"DynASynLoadDataset", "DynASynLoadRun", "DynASynContinueTraining", "LoadImage", "LoadImageMask"}


@pytest.mark.parametrize("name", TEMPLATES)
def test_no_template_needs_what_another_workflow_writes(server, name):
    """As Queue sends it (muted nodes left out), each template makes its own inputs: only model files are needed
    (dynasyn_sample's checkpoint is the one dynasyn_full exports)."""
    workflow = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    prompt = ui_to_api(workflow, server.get("/object_info"))
    assert not {v["class_type"] for v in prompt.values()} & READS_SAVED, name


def test_train_template_builds_its_dataset_with_the_stage_nodes(server):
    """dynasyn_train.json on the tiny model: Drafts -> Compose -> stock inpaint -> GSA -> Make Pair -> Train, with
    its (muted) Load Dataset left out, so it runs where no dataset was ever saved."""
    workflow = json.loads((ROOT / "example_workflows" / "dynasyn_train.json").read_text())
    prompt = substitute(ui_to_api(workflow, server.get("/object_info")), tiny=True)
    assert {v["class_type"] for v in prompt.values()} >= {"DynASynDrafts", "DynASynCompose", "SetLatentNoiseMask",
                                                          "DynASynGSA", "DynASynMakePair", "DynASynTrain"}
    entry = server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    out = entry["outputs"]
    assert out[nodes_of(prompt, "DynASynDrafts")[0]]["text"][0].startswith("1 drafts kept of 1")
    assert out[nodes_of(prompt, "DynASynMakePair")[0]]["text"][0].startswith("1 pair(s) added (1 in the dataset)")
    samples = [k for k in nodes_of(prompt, "SaveImage") if prompt[k]["inputs"]["filename_prefix"] == "dynasyn/sample"]
    assert len(out[samples[0]]["images"]) == 2  # the trained model drew the new scene
