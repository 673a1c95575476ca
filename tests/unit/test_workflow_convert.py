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
