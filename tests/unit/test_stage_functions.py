"""The augmentation stage's steps as the stage nodes call them (library level, no ComfyUI): drafts of a slice of
the prompts keep their seeds, a pair from any picture, and a pair prompt's markers checked."""

import pytest
import torch

from dynasyn.augment import AugmentConfig, DiffusersRenderer, compose, drafts_with_masks, make_pair
from dynasyn.errors import DynASynError
from dynasyn.gsa import GSAConfig
from dynasyn.prompts import PromptTemplate, offline_prompts, pair_prompt
from dynasyn.sam import build_tiny_sam
from dynasyn.tiny import tiny_components
from tests.support.scene import tensor_scene as scene


@pytest.fixture(scope="module")
def renderer():
    cfg = AugmentConfig(size=64, draft_steps=2, guidance_scale=5.0, seed=4, gsa=GSAConfig(steps=4))
    return DiffusersRenderer(tiny_components(seed=0), cfg)


def test_a_slice_of_the_prompts_draws_the_same_drafts_as_the_whole_list(renderer):
    templates = offline_prompts(2, 3, seed=0)
    descriptions = ["red panda", "blue bowl"]
    whole = list(drafts_with_masks(renderer, templates, descriptions, 2, renderer.cfg))
    part = list(drafts_with_masks(renderer, templates[2:], descriptions, 2, renderer.cfg, first=2))
    assert [k for k, _, _ in whole] == [0, 1, 2] and [k for k, _, _ in part] == [0]
    assert torch.equal(part[0][1].image, whole[2][1].image)  # prompt 3 uses seed + 2 either way
    assert torch.equal(part[0][2], whole[2][2]) and part[0][2].shape == (2, 64, 64)
    assert not torch.equal(whole[0][1].image, whole[1][1].image)
    stopped = list(drafts_with_masks(renderer, templates, descriptions, 2, renderer.cfg, should_stop=lambda: True))
    assert stopped == []


def test_make_pair_from_any_picture():
    image, masks, nouns = scene()
    template = PromptTemplate("[2] under [1] on a beach")
    pasted = torch.stack(masks)
    pair = make_pair(image, template, nouns, pasted, AugmentConfig(pseudo_masks="pasted"))
    pair.validate(2, nouns)
    assert pair.class_prompt == "bowl under panda on a beach" and pair.subjects == [1, 0]
    assert torch.equal(pair.masks, pasted[[1, 0]]) and pair.meta["mask_source"] == "pasted"
    # with SAM the subjects are found again on the picture (the tiny SAM fills each prompt box, grown by 15%)
    found = make_pair(image, template, nouns, pasted, AugmentConfig(), sam=build_tiny_sam())
    assert found.meta["mask_source"] == "resegmented" and torch.equal(found.masks, found.meta["resegmented_masks"])
    assert (found.masks >= pasted[[1, 0]]).all() and found.masks.sum() > pasted.sum()
    # masks made at another size follow the picture's
    small = make_pair(image, template, nouns, pasted[:, ::2, ::2], AugmentConfig(pseudo_masks="pasted"))
    assert small.masks.shape == (2, 64, 64)


def test_compose_is_paste_subjects_with_the_configs_settings():
    image, masks, _ = scene()
    draft = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    pseudo = torch.zeros(2, 64, 64)
    pseudo[0, 4:28, 2:42] = 1    # wider than the square panda: the draft's panda shows beside the paste
    pseudo[1, 36:62, 30:62] = 1
    tight = compose(draft, pseudo, image, masks, AugmentConfig(inpaint_dilation=0))
    wide = compose(draft, pseudo, image, masks, AugmentConfig(inpaint_dilation=6))
    assert tight.skipped == wide.skipped == [] and wide.inpaint_mask.sum() > tight.inpaint_mask.sum() > 0
    assert torch.equal(tight.image, wide.image)


@pytest.mark.parametrize("text, error", [
    ("a panda hugging a bowl", "has no subject marker"),
    ("[1] and [3] on a beach", r"names subject \[3\], but there are 2 subjects"),
    ("[0] alone", r"names subject \[0\]"),
    ("[2] chasing [2]", r"names \[2\] more than once"),
])
def test_pair_prompts_need_their_markers(text, error):
    with pytest.raises(DynASynError, match=error):
        pair_prompt(text, 2)


def test_pair_prompt_keeps_the_text_and_allows_a_subset():
    assert pair_prompt("  [2]   sleeping\n on a boat ", 2).text == "[2] sleeping on a boat"
    assert pair_prompt("[1] hugging [2]", 2).subjects == [0, 1]
    with pytest.raises(DynASynError, match=r"there is 1 subject \(\[1\] to \[1\]\)"):
        pair_prompt("[1] and [2]", 1)


def test_config_checks_come_first():
    with pytest.raises(DynASynError, match="draft_batch must be at least 1"):
        AugmentConfig(draft_batch=0)
    with pytest.raises(DynASynError, match="pseudo_masks must be one of resegmented, pasted"):
        AugmentConfig(pseudo_masks="given")
