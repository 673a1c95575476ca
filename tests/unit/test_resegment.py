"""L_AUG's pseudo-masks come from the GSA output (re-segmented), not from the silhouettes pasted before GSA."""

import pytest
import torch

from dynasyn.augment import AugmentConfig, augment
from dynasyn.dataset import load_dataset, save_dataset
from dynasyn.drafts import inner_point, resegment
from dynasyn.errors import DynASynError
from dynasyn.gsa import GSAConfig
from dynasyn.prompts import offline_prompts
from dynasyn.sam import build_tiny_sam
from dynasyn.tiny import tiny_components
from tests.support.scene import tensor_scene as scene


def box(y0, y1, x0, x1, size=64):
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = 1
    return m


def test_inner_point_is_deep_inside_the_mask():
    ell = box(10, 50, 10, 20) + box(40, 50, 10, 60)   # an L: its centroid lies outside it
    ell = ell.clamp(0, 1)
    x, y = inner_point(ell)
    assert ell[y - 4:y + 5, x - 4:x + 5].all()         # as far from the outline as the L allows
    assert inner_point(torch.zeros(8, 8)) is None


def test_without_sam_the_gsa_attention_decides_inside_the_grown_box():
    image = torch.zeros(64, 64, 3)
    pasted = torch.stack([box(16, 32, 16, 32), box(40, 60, 40, 60)])
    attn = torch.zeros(2, 16, 16)
    attn[0, 5:9, 6:9] = 1.0            # subject 1 moved down-right by GSA (still near its pasted box)
    attn[0, 12:16, 12:16] = 0.9        # the other subject's spot: outside subject 1's box, dropped
    out, kept = resegment(image, pasted, attention=attn)
    assert kept == [1]                 # nothing found for subject 2: its pasted mask is kept
    assert torch.equal(out[1], pasted[1])
    ys, xs = torch.nonzero(out[0], as_tuple=True)
    assert out[0].sum() > 0 and int(ys.max()) >= 32 and out[0][48:, 48:].sum() == 0
    assert not torch.equal(out[0], pasted[0])
    with pytest.raises(DynASynError, match="one per subject"):
        resegment(image, pasted, attention=attn[:1])


def test_with_sam_the_prompt_is_the_pasted_box_grown_and_its_inner_point():
    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    pasted = box(20, 40, 10, 30)[None]
    out, kept = resegment(image, pasted, build_tiny_sam())   # the test SAM fills its prompt box
    assert kept == [] and torch.equal(out[0], box(17, 43, 7, 33))


@pytest.mark.parametrize("use_sam", [False, True])
def test_augment_keeps_both_masks_and_trains_on_the_resegmented_ones(use_sam, tmp_path):
    comps = tiny_components(seed=0)
    image, masks, nouns = scene()
    templates = offline_prompts(2, 2, seed=0)
    runs = {}
    for source in ("resegmented", "pasted"):
        cfg = AugmentConfig(size=64, draft_steps=3, inpaint_steps=3, min_mask_pixels=4, gsa=GSAConfig(steps=10),
                            pseudo_masks=source)
        runs[source] = augment(comps, image, masks, nouns, ["red panda", "blue bowl"], templates, cfg,
                               sam=build_tiny_sam() if use_sam else None)
    assert runs["resegmented"].pairs, runs["resegmented"].skipped
    differs = False
    for reseg, pasted in zip(runs["resegmented"].pairs, runs["pasted"].pairs):
        for p in (reseg, pasted):
            assert p.meta["pasted_masks"].shape == p.meta["resegmented_masks"].shape == p.masks.shape
        assert reseg.meta["mask_source"] == "resegmented" and torch.equal(reseg.masks, reseg.meta["resegmented_masks"])
        assert pasted.meta["mask_source"] == "pasted" and torch.equal(pasted.masks, pasted.meta["pasted_masks"])
        assert torch.equal(reseg.meta["resegmented_masks"], pasted.meta["resegmented_masks"])  # same run otherwise
        differs |= not torch.equal(reseg.masks, reseg.meta["pasted_masks"])
    assert differs  # re-segmentation changed at least one mask
    pair = runs["resegmented"].pairs[0]
    back = load_dataset(save_dataset([pair], tmp_path / "ds"))[0]
    for key in ("pasted_masks", "resegmented_masks"):
        assert torch.equal(back.meta[key], (pair.meta[key] > 0.5).float())
    assert back.meta["mask_source"] == "resegmented"
    with pytest.raises(DynASynError, match="pseudo_masks"):
        augment(comps, image, masks, nouns, nouns, templates, AugmentConfig(size=64, pseudo_masks="drawn"))
