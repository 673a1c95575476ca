"""demo/workflow.py: UI-format workflow -> API prompt, laying out widget values as the frontend's graphToPrompt does."""

from demo.workflow import ui_to_api


def test_a_seed_marked_control_after_generate_false_has_no_control_value():
    info = {
        "Trainer": {"input": {"required": {"seed": ["INT", {"control_after_generate": False}], "steps": ["INT", {}]}},
                    "input_order": {"required": ["seed", "steps"]}},
        "Sampler": {"input": {"required": {"noise_seed": ["INT", {}], "steps": ["INT", {}]}},
                    "input_order": {"required": ["noise_seed", "steps"]}},
    }
    workflow = {"nodes": [{"id": 1, "type": "Trainer", "widgets_values": [7, 20]},
                          {"id": 2, "type": "Sampler", "widgets_values": [5, "fixed", 30]}], "links": []}
    prompt = ui_to_api(workflow, info)
    assert prompt["1"]["inputs"] == {"seed": 7, "steps": 20}
    assert prompt["2"]["inputs"] == {"noise_seed": 5, "steps": 30}


def test_demo_puts_your_picture_masks_and_nouns_in_place_of_the_example_scene():
    from demo.__main__ import substitute

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "10": {"class_type": "DynASynExampleScene", "inputs": {"scene": "ball and box, 512 px (SD 1.5 / 2.1)"}},
        "20": {"class_type": "DynASynDescribeSubjects", "inputs": {"image": ["10", 0], "masks": ["10", 1],
                                                                   "class_nouns": ["10", 2],
                                                                   "phrases": "a green and blue dotted ball\na box"}},
        "40": {"class_type": "DynASynTrain", "inputs": {"model": ["1", 0], "image": ["10", 0], "masks": ["10", 1],
                                                        "class_nouns": ["20", 1]}},
    }
    # no picture given: the workflow's own Example Scene stays
    assert substitute(prompt, tiny=False, ckpt_name="x.safetensors")["10"] == prompt["10"]
    out = substitute(prompt, tiny=False, ckpt_name="x.safetensors", image_name="me.png", mask_names=["m1.png", "m2.png"],
                     nouns="dog, cat")
    assert out["10"] == {"class_type": "LoadImage", "inputs": {"image": "me.png"}}
    batch = out["20"]["inputs"]["masks"][0]
    assert out["40"]["inputs"]["masks"] == [batch, 0] and out[batch]["class_type"] == "DynASynMaskBatch"
    loaders = [out[v[0]] for k, v in sorted(out[batch]["inputs"].items())]
    assert [m["inputs"]["image"] for m in loaders] == ["m1.png", "m2.png"]
    assert all(m["class_type"] == "LoadImageMask" for m in loaders)
    assert out["20"]["inputs"]["class_nouns"] == "dog, cat"
    assert out["20"]["inputs"]["phrases"] == ""  # the workflow's descriptions were of its own subjects
    assert out["40"]["inputs"]["class_nouns"] == ["20", 1]  # Describe's cleaned nouns stay linked
    assert not any(n["class_type"] == "DynASynExampleScene" for n in out.values())


def test_demo_step_options_override_the_tiny_settings_and_are_bounded(capsys):
    from demo.__main__ import main, substitute

    prompt = {"40": {"class_type": "DynASynTrain", "inputs": {"phase1_steps": 400, "phase2_steps": 400}},
              "50": {"class_type": "KSampler", "inputs": {"steps": 20}}}
    out = substitute(prompt, tiny=True, train_steps={"phase1_steps": 5000})
    steps = {k: out["40"]["inputs"][k] for k in ("phase1_steps", "phase2_steps")}
    assert steps == {"phase1_steps": 5000, "phase2_steps": 20}  # phase 2 keeps the tiny setting
    assert out["50"]["inputs"]["steps"] == 10
    assert main(["--tiny", "--phase2-steps", "-1"]) == 2
    assert "--phase2-steps -1: give 0 to 100000 steps." in capsys.readouterr().err
