"""DynASyn Example Scene in-process (real ComfyUI modules), and the seed widgets of every node of the pack."""

import importlib

import numpy as np
import pytest
import torch


def test_example_scene_outputs_comfyui_types(pack, tmp_path, monkeypatch):
    import folder_paths

    lib = importlib.import_module("dynasyn_pack.dynasyn.example_scene")
    SCENES, example_scene = lib.SCENES, lib.example_scene

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    node = pack.NODE_CLASS_MAPPINGS["DynASynExampleScene"]
    assert node.INPUT_TYPES()["required"]["scene"][0] == list(SCENES)
    for name in SCENES:
        out = node().scene(name)
        image, masks, nouns = out["result"]
        ex = example_scene(name)
        h, w = ex.image.shape[:2]
        assert image.shape == (1, h, w, 3) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert masks.shape == (2, h, w) and set(masks.unique().tolist()) == {0.0, 1.0}
        assert np.array_equal((image[0] * 255).round().byte().numpy(), ex.image)
        assert nouns == ex.class_nouns == "ball, box"
        # the node's preview: the picture, then the masks tinted, in ComfyUI's temp folder
        shown = out["ui"]["images"]
        assert [s["type"] for s in shown] == ["temp", "temp"]
        for s in shown:
            assert (tmp_path / s["subfolder"] / s["filename"]).stat().st_size > 100


def test_unknown_scene_is_a_clear_error(pack, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    node = pack.NODE_CLASS_MAPPINGS["DynASynExampleScene"]
    with pytest.raises(RuntimeError, match="DynASyn: Unknown example scene"):
        node().scene("../input/secret.png")
    # ComfyUI's list check is replaced by the node's own (earlier labels still run), which refuses the same
    assert node.VALIDATE_INPUTS("../input/secret.png").startswith("Unknown example scene")
    assert node.VALIDATE_INPUTS({"__value__": ["x"]}).startswith("Unknown example scene")  # not a crash
    assert node.VALIDATE_INPUTS(None) is True  # a linked input: checked when the node runs
    renamed = importlib.import_module("dynasyn_pack.dynasyn.example_scene").RENAMED
    for old, new in renamed.items():
        assert node.VALIDATE_INPUTS(old) is True
        assert np.array_equal(node().scene(old)["result"][0], node().scene(new)["result"][0])


def test_no_seed_of_the_pack_randomizes_by_default(pack):
    """The frontend adds a 'control after generate' widget set to randomize to every INT named seed / noise_seed unless
    the input says control_after_generate: False; on a node that trains or generates for minutes, a randomized seed
    would retrain on every Queue. Every seed of the pack says False (a new node added from the menu keeps its seed)."""
    seeds = []
    for cls_name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                opts = s[1] if len(s) > 1 else {}
                if s[0] == "INT" and (name in ("seed", "noise_seed") or "control_after_generate" in opts):
                    seeds.append(cls_name)
                    assert opts.get("control_after_generate") is False, f"{cls_name}.{name}"
    assert {"DynASynTrain", "DynASynAugment", "DynASynGSA", "DynASynAugmentPrompts"} <= set(seeds)

