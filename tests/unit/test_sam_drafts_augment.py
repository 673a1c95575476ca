import pytest
import torch

from dynasyn.augment import AugmentConfig, augment
from dynasyn.drafts import attention_prompt
from dynasyn.errors import DynASynError
from dynasyn.gsa import GSAConfig
from dynasyn.prompts import offline_prompts
from dynasyn.sam import SubjectPrompt, build_tiny_sam, load_sam, save_sam, segment
from dynasyn.tiny import tiny_components
from tests.support.scene import tensor_scene as scene


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory):
    return save_sam(build_tiny_sam(seed=1), tmp_path_factory.mktemp("sams") / "sam_tiny_test.pth")


def test_box_and_point_prompts_give_one_mask_per_subject(tiny_sam_file):
    sam = load_sam(tiny_sam_file)  # the real loading path: registry-free build + torch.load(weights_only=True)
    image, _, _ = scene()
    prompts = [SubjectPrompt(box=(5, 5, 30, 30)), SubjectPrompt(points=[(45, 47), (10, 10)], labels=[1, 0]),
               SubjectPrompt(box=(30, 35, 60, 60), points=[(45, 47)])]
    masks = segment(sam, image, prompts)
    assert masks.shape == (3, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[5:30, 5:30] = False
    assert masks[0][outside].sum() == 0 and masks[0][~outside].all()  # the test SAM fills its box, clipped
    assert torch.equal(segment(sam, image, prompts), masks)  # deterministic


def test_missing_or_wrong_sam_file_is_a_clear_error(tmp_path):
    with pytest.raises(DynASynError, match="models/sams"):
        load_sam(tmp_path / "sam_vit_h_4b8939.pth")
    bad = tmp_path / "sam_vit_b_bad.pth"
    torch.save({"nothing": torch.zeros(1)}, bad)
    with pytest.raises(DynASynError, match="not a SAM vit_b checkpoint"):
        load_sam(bad)
    with pytest.raises(DynASynError, match="vit_b, vit_l or vit_h"):
        load_sam(bad.rename(tmp_path / "weights.pth"))
    with pytest.raises(DynASynError, match="box or at least one point"):
        SubjectPrompt()


def test_attention_peak_becomes_box_and_point():
    attn = torch.zeros(16, 16)
    attn[2:6, 10:14] = 1.0
    attn[3, 11] = 2.0
    prompt, region = attention_prompt(attn, (64, 64))
    x0, y0, x1, y1 = prompt.box
    assert 36 <= x0 < 44 and 52 <= x1 <= 60 and 4 <= y0 < 12 and 20 <= y1 <= 28
    px, py = prompt.points[0]
    assert x0 <= px < x1 and y0 <= py < y1 and region[py, px] == 1


@pytest.mark.parametrize("use_sam", [False, True])
def test_augment_stage_makes_training_pairs(use_sam):
    comps = tiny_components(seed=0)
    image, masks, nouns = scene()
    templates = offline_prompts(2, 2, seed=0)
    cfg = AugmentConfig(size=64, draft_steps=3, inpaint_steps=3, min_mask_pixels=4, gsa=GSAConfig(steps=10))
    seen = []
    report = augment(comps, image, masks, nouns, ["red panda", "blue bowl"], templates, cfg,
                     sam=build_tiny_sam() if use_sam else None, progress=lambda k, n, p, img: seen.append((k, n, p)))
    assert len(report.pairs) + len(report.skipped) == 2 and len(report.drafts) == 2
    assert [s[0] for s in seen] == [0, 1] and "red panda" in seen[0][2]
    for pair, t in zip(report.pairs, templates):
        pair.validate(2, nouns)                     # what the trainer checks
        assert pair.class_prompt == t.render(nouns) and pair.subjects == t.subjects
        assert pair.image.shape == (64, 64, 3) and pair.masks.shape == (2, 64, 64)
        assert pair.meta["start_timestep"] == 699
    # draft 3 + inpaint 3 (when a gap was left) + GSA int(10 * 0.7) = 7 from t = 699
    assert report.unet_evaluations == sum(3 + 7 + 3 * p.meta["inpainted"] for p in report.pairs) + 3 * len(report.skipped)


def test_augment_skips_a_draft_without_a_subject_and_counts_it(monkeypatch):
    import dynasyn.augment as aug

    comps = tiny_components(seed=0)
    image, masks, nouns = scene()
    real = aug.pseudo_masks

    def lose_the_bowl(draft, n, sam=None, threshold=0.5, detector=None):
        out = real(draft, n, sam, threshold, detector)
        out[1] = 0
        return out

    monkeypatch.setattr(aug, "pseudo_masks", lose_the_bowl)
    report = augment(comps, image, masks, nouns, nouns, offline_prompts(2, 1), AugmentConfig(size=64, draft_steps=2,
                     gsa=GSAConfig(steps=4)))
    assert report.pairs == [] and report.skipped == [(0, "no pseudo-mask for bowl")]
    with pytest.raises(DynASynError, match="K = 0"):
        augment(comps, image, masks, nouns, nouns, [])
    with pytest.raises(DynASynError, match="one of each per subject"):
        augment(comps, image, masks[:1], nouns, nouns, offline_prompts(2, 1))


def test_draft_batch_changes_nothing_but_the_grouping():
    comps = tiny_components(seed=0)
    image, masks, nouns = scene()
    templates = offline_prompts(2, 3, seed=3)
    runs = []
    for batch in (1, 2):
        seen = []
        cfg = AugmentConfig(size=64, draft_steps=2, inpaint_steps=2, min_mask_pixels=4, gsa=GSAConfig(steps=4), draft_batch=batch)
        runs.append((augment(comps, image, masks, nouns, nouns, templates, cfg,
                             progress=lambda k, n, p, img: seen.append(k)), seen))
    (one, seen1), (two, seen2) = runs
    assert seen1 == seen2 == [0, 1, 2]  # progress per prompt either way
    assert len(one.drafts) == len(two.drafts) == 3 and one.skipped == two.skipped
    for a, b in zip(one.drafts, two.drafts):
        assert torch.equal(a, b)
    for a, b in zip(one.pairs, two.pairs):
        assert torch.equal(a.image, b.image) and a.meta["seed"] == b.meta["seed"]
    with pytest.raises(DynASynError, match="draft_batch"):
        augment(comps, image, masks, nouns, nouns, templates, AugmentConfig(size=64, draft_batch=0))
