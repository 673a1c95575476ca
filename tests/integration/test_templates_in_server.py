"""The shipped templates through the real server's HTTP API (as the page's Queue sends it): none needs what another
workflow writes; the Shapes World one, as shipped, runs the whole pipeline (Example Scene -> augment -> Train ->
sample) with nothing to download or upload. (dynasyn_train, which builds its dataset with the stage nodes, runs on the
tiny model in tests/browser, on a server where nothing was saved yet; dynasyn_full runs in test_demo.py.)"""

import json
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

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
    assert len(embeddings) == 2 and " right of " in scene_prompt, scene_prompt
    for name in embeddings:
        vec = next(iter(load_file(server.base / "models" / "embeddings" / f"{name}.safetensors").values()))
        assert vec.shape[-1] == 64  # the Shapes World text width
    augment = nodes_of(prompt, "DynASynAugment")[0]
    assert "dynasyn_gallery" in entry["outputs"][augment]  # augmented pairs were made
    samples = [k for k in nodes_of(prompt, "SaveImage") if prompt[k]["inputs"]["filename_prefix"] == "dynasyn/shapes_world"]
    pictures = saved_pictures(server, entry["outputs"][samples[0]]["images"])
    assert len(pictures) == 8 and all(p.shape == (64, 64, 3) and p.std() > 5 for p in pictures)

    # the method learns: the trained subjects are in the samples, found by the scorer with their class and both
    # colours, far more often than the untrained model draws them for the same scene with the class nouns (its
    # placeholders start as the class nouns; same sampler, seeds and latents): the first test that DynASyn
    # learns, not only that it runs. A second seed (the run is loaded, only sampling runs again) doubles the count.
    from dynasyn.example_scene import SHAPES_SUBJECTS
    from dynasyn.shapes import identity

    subjects = [identity.NovelSubject(*s) for s in SHAPES_SUBJECTS]
    scene_text = prompt[scene]["inputs"]["scene"]  # "[1] right of [2] in the snow"
    ksampler = nodes_of(prompt, "KSampler")[0]
    sampler, latent = prompt[ksampler]["inputs"], prompt[nodes_of(prompt, "EmptyLatentImage")[0]]["inputs"]
    seeds = (sampler["seed"], sampler["seed"] + 1)
    again = json.loads(json.dumps(prompt))
    again[ksampler]["inputs"]["seed"] = seeds[1]
    entry = server.run(again, timeout=900)
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    pictures += saved_pictures(server, entry["outputs"][samples[0]]["images"])

    untrained_pictures = []
    for seed in seeds:
        baseline = server.run({
            "1": {"class_type": "DynASynShapesWorldModel", "inputs": {}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {
                "clip": ["1", 1], "text": scene_text.replace("[1]", "a ball").replace("[2]", "a box")}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "4": {"class_type": "EmptyLatentImage", "inputs": dict(latent)},
            "5": {"class_type": "KSampler", "inputs": {**{k: v for k, v in sampler.items() if not isinstance(v, list)},
                                                        "seed": seed, "model": ["1", 0], "positive": ["2", 0],
                                                        "negative": ["3", 0], "latent_image": ["4", 0]}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "shapes_baseline/out"}}})
        assert baseline["status"]["status_str"] == "success", execution_error(baseline) or server.log()[-3000:]
        untrained_pictures += saved_pictures(server, baseline["outputs"]["7"]["images"])

    def found_rates(pics):  # per subject: in how many pictures the scorer finds it with its class and both colours
        found = [identity.find_subjects(p, subjects) for p in pics]
        return [float(np.mean([f[i] is not None and f[i].identity(s) for f in found])) for i, s in enumerate(subjects)]

    per_subject, per_subject_untrained = found_rates(pictures), found_rates(untrained_pictures)
    trained, untrained = float(np.mean(per_subject)), float(np.mean(per_subject_untrained))
    print(f"identity over {len(pictures)} pictures: trained {trained:.3f}, untrained {untrained:.3f}; "
          f"per subject trained {per_subject}, untrained {per_subject_untrained}")
    # measured here (2026-12-08, the weights that read "left of" / "right of"): trained 0.969, untrained 0.000 (16
    # pictures of 2 subjects each; ball 0.94, box 1.00). On the earlier weights 0.938 against 0.031. Over training
    # seeds, on the first 8 pictures: the workflow's seed 0 (its default) finds the ball and the box 8 times each;
    # seeds 1-3 the ball 1, 6 and 8 times and the box 8 times each (README, the demo). With seed 1 the ball would most
    # likely fail its bar here (4 of 16 above the untrained count; not measured over 16); the shipped seed's is far
    # above it.
    assert trained >= untrained + 0.4, (trained, untrained)
    for rate, base in zip(per_subject, per_subject_untrained):
        assert rate >= base + 0.25, (per_subject, per_subject_untrained)


def saved_pictures(server, images):
    return [np.asarray(Image.open(server.base / "output" / s["subfolder"] / s["filename"]).convert("RGB")) for s in images]


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


def test_a_workflow_saved_with_the_example_scenes_earlier_label_still_runs(server):
    """The Shapes World pair was renamed when its subjects changed: the old label still validates and draws
    today's pair; an unknown label is refused before anything runs, saying which scenes there are."""
    from dynasyn.example_scene import RENAMED, SHAPES_PAIR

    def graph(label):
        return {"1": {"class_type": "DynASynExampleScene", "inputs": {"scene": label}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}

    (old,) = RENAMED
    entry = server.run(graph(old))
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    status, reply = server.post("/prompt", {"prompt": graph("../../etc/passwd")})
    assert status == 400 and "Unknown example scene" in json.dumps(reply) and SHAPES_PAIR in json.dumps(reply)
