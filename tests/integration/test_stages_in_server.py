"""The stage nodes in the real server, rewired with stock ComfyUI nodes: Drafts -> Compose -> (VAEEncode +
SetLatentNoiseMask | VAEEncodeForInpaint) + KSampler -> VAEDecode -> Make Pair (x2, appended) -> Train, on the
tiny model; and the nodes' help pages where the frontend reads them."""

import json
import urllib.request

import pytest

from tests.integration.test_augment_in_server import SAM_PROMPTS
from tests.integration.test_train_in_server import train_graph
from tests.support.comfy_server import execution_error
from tests.support.scene import write_scene

pytestmark = pytest.mark.slow
TINY_SAM = "tiny (random test-size SAM, for trying graphs)"


def stages_graph(run_name):
    g = train_graph(run_name, phase1=1, phase2=1)  # "1" tiny model, "2" scene.png, "6" Train ... "12" SaveImage
    g.update({
        "30": {"class_type": "DynASynSAMLoader", "inputs": {"sam_name": TINY_SAM}},
        "31": {"class_type": "DynASynSAMMasks", "inputs": {"sam": ["30", 0], "image": ["2", 0],
                                                         "subject_prompts": SAM_PROMPTS, "clip_to_box": True}},
        "32": {"class_type": "DynASynDescribeSubjects", "inputs": {
            "image": ["2", 0], "masks": ["31", 0], "class_nouns": "panda, bowl", "mode": "offline", "model": "llava",
            "endpoint": "http://127.0.0.1:9/v1", "timeout": 5.0, "seed": 0, "phrases": "red panda\nblue bowl"}},
        "33": {"class_type": "DynASynAugmentPrompts", "inputs": {
            "descriptions": ["32", 0], "class_nouns": ["32", 1], "count": 2, "mode": "offline", "model": "llama3.1",
            "endpoint": "http://127.0.0.1:9/v1", "timeout": 5.0, "seed": 0}},
        "34": {"class_type": "DynASynDrafts", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "prompts": ["33", 0], "first": 1, "count": 1,
            "size": 64, "steps": 3, "guidance": 5.0, "seed": 0, "sampler_name": "euler", "scheduler": "normal",
            "batch": 1, "sam": ["30", 0]}},
        "35": {"class_type": "DynASynCompose", "inputs": {"reference": ["2", 0], "masks": ["31", 0], "drafts": ["34", 0],
                                                        "pseudo_masks": ["34", 1], "dilation": 4}},
        "36": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ["34", 3]}},
        "37": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        # inpaint with the same model: VAEEncode + SetLatentNoiseMask
        "38": {"class_type": "VAEEncode", "inputs": {"pixels": ["35", 0], "vae": ["1", 2]}},
        "39": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["38", 0], "mask": ["35", 1]}},
        "40": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["36", 0], "negative": ["37", 0],
                                                     "latent_image": ["39", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "41": {"class_type": "VAEDecode", "inputs": {"samples": ["40", 0], "vae": ["1", 2]}},
        "42": {"class_type": "DynASynMakePair", "inputs": {"image": ["41", 0], "prompt": ["34", 2],
                                                         "class_nouns": ["32", 1], "masks": ["35", 2], "sam": ["30", 0]}},
        # the inpainting-model route: VAEEncodeForInpaint; its pair is added to the first one's
        "43": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["35", 0], "vae": ["1", 2], "mask": ["35", 1],
                                                             "grow_mask_by": 2}},
        "44": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["36", 0], "negative": ["37", 0],
                                                     "latent_image": ["43", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "45": {"class_type": "VAEDecode", "inputs": {"samples": ["44", 0], "vae": ["1", 2]}},
        "46": {"class_type": "DynASynMakePair", "inputs": {"image": ["45", 0], "prompt": ["34", 2],
                                                         "class_nouns": ["32", 1], "masks": ["35", 2],
                                                         "dataset": ["42", 0]}},
        "47": {"class_type": "DynASynSaveDataset", "inputs": {"dataset": ["46", 0], "name": f"{run_name}_ds"}},
    })
    g["6"]["inputs"]["dataset"] = ["47", 1]
    return g


def test_stage_nodes_with_stock_inpainting_then_train(server):
    write_scene(server.base / "input")
    entry = server.run(stages_graph("it_stages"))
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    out = entry["outputs"]
    assert out["34"]["text"][0].startswith("1 drafts kept of 1")
    assert out["42"]["text"][0] == "1 pair(s) added (1 in the dataset); masks found again by SAM"
    assert out["46"]["text"][0] == "1 pair(s) added (2 in the dataset); masks as given"
    index = json.loads((server.base / "user" / "__dynasyn" / "datasets" / "it_stages_ds" / "dataset.json").read_text())
    assert len(index["pairs"]) == 2
    for pair in index["pairs"]:
        assert pair["class_prompt"].count("panda") == 1 and pair["class_prompt"].count("bowl") == 1
        assert sorted(pair["subjects"]) == [0, 1]
    assert [p["meta"]["mask_source"] for p in index["pairs"]] == ["resegmented", "pasted"]
    assert "6" in out and len(out["12"]["images"]) == 1  # Train ran on the two pairs, its MODEL sampled


def test_stage_node_bad_input_is_a_clear_error(server):
    write_scene(server.base / "input")
    g = stages_graph("it_stages_bad")
    g["42"]["inputs"]["prompt"] = "a panda hugging a bowl"  # no subject markers
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "has no subject marker: write each subject it shows as [1], [2]" in execution_error(entry)
    g = stages_graph("it_stages_bad2")
    g["48"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["34", 0], "amount": 2}}
    g["35"]["inputs"]["drafts"] = ["48", 0]  # 2 drafts, but the pseudo-masks of 1
    entry = server.run(g)
    assert "2 pseudo-masks for 2 image(s) of 2 subjects: give 4" in execution_error(entry)


def test_help_pages_are_served_where_the_frontend_reads_them(server):
    info = server.get("/object_info")
    for name in ("DynASynDrafts", "DynASynCompose", "DynASynMakePair", "DynASynLLMSettings", "DynASynTrain"):
        pack = info[name]["python_module"].split(".")[1]  # how the frontend names the pack (custom_nodes.<folder>)
        with urllib.request.urlopen(f"{server.url}/extensions/{pack}/docs/{name}.md", timeout=30) as r:
            assert r.status == 200
            assert r.read().decode().startswith(f"# {info[name]['display_name']}\n")
