"""The optional zero-shot detector for pseudo-masks: a tiny random OWL-ViT saved and loaded like a real one."""

import pytest
import torch

from dynasyn.drafts import Draft, pseudo_masks
from dynasyn.errors import DynASynError
from dynasyn.grounding import detect, load_detector
from dynasyn.prompts import PromptTemplate
from tests.support.tiny_detector import write_tiny_grounding_dino, write_tiny_owlvit


@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory):
    return write_tiny_owlvit(tmp_path_factory.mktemp("grounding") / "owlvit-tiny")


def test_detector_loads_and_gives_one_box_or_none_per_phrase(owl_folder):
    det = load_detector(owl_folder, threshold=0.0)  # the real loading path: Auto classes, local files only
    image = torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(1))
    boxes = detect(det, image, ["red panda", "blue bowl"])
    assert len(boxes) == 2 and all(b is not None for b in boxes)  # threshold 0: the best box always counts
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 48
    assert detect(det, image, ["red panda", "blue bowl"]) == boxes  # deterministic
    det.threshold = 2.0  # sigmoid scores never reach it: nothing is found
    assert detect(det, image, ["red panda"]) == [None]


def test_detected_box_replaces_the_attention_box(monkeypatch):
    import dynasyn.grounding as grounding

    attn = torch.zeros(2, 16, 16)
    attn[0, 2:6, 2:6] = 1    # subject 1 drawn top-left
    attn[1, 10:14, 10:14] = 1
    draft = Draft(torch.rand(64, 64, 3), PromptTemplate("[1] next to [2]"), "a panda next to a bowl", attn, ["panda", "bowl"])
    monkeypatch.setattr(grounding, "detect", lambda det, image, phrases: [None, (0, 40, 24, 64)])
    masks = pseudo_masks(draft, 2, sam=None, detector=object())
    assert masks[0][10:22, 10:22].all() and masks[0][32:].sum() == 0  # not found: the attention region stays
    assert masks[1][40:64, 0:24].all() and masks[1].sum() == 24 * 24  # found: the box (no attention inside it)


def test_grounding_dino_detects_phrases_from_one_dotted_text(tmp_path):
    det = load_detector(write_tiny_grounding_dino(tmp_path / "grounding-dino-tiny"), threshold=0.0)
    assert det.model_type == "grounding-dino"
    image = torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(1))
    boxes = detect(det, image, ["Red panda", "blue bowl"])
    assert len(boxes) == 2 and any(b is not None for b in boxes)
    for b in filter(None, boxes):
        x0, y0, x1, y1 = b
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 48


def test_missing_or_wrong_detector_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DynASynError, match="models/grounding"):
        load_detector(tmp_path / "grounding-dino-tiny")
    from transformers import CLIPTextConfig

    CLIPTextConfig().save_pretrained(tmp_path / "clip")
    with pytest.raises(DynASynError, match="OWL-ViT, OWLv2, Grounding DINO"):
        load_detector(tmp_path / "clip")
