"""c_a / ĉ_a of augmented pairs: built from the template markers, whole words, token positions by marker order."""

import pytest
import torch

from dynasyn.dataset import AugmentedPair, augmented_prompt_pair, load_dataset, placeholder_prompt, save_dataset
from dynasyn.errors import DynASynError
from dynasyn.subjects import add_placeholder_tokens
from dynasyn.tiny import tiny_components
from dynasyn.train import DynASynTrainer, TrainConfig
from tests.support.scene import tensor_scene as scene

TOKENS = ["<asset0>", "<asset1>"]


@pytest.mark.parametrize("prompt, nouns, want", [
    ("dog playing catch with cat in a park", ["dog", "cat"], "<asset0> playing catch with <asset1> in a park"),
    ("cat peeking out of a box next to an ox", ["cat", "ox"], "<asset0> peeking out of a box next to an <asset1>"),
    ("dog carrying a backpack beside a car", ["dog", "car"], "<asset0> carrying a backpack beside a <asset1>"),
    ("cat on a city street under a tree", ["cat", "tree"], "<asset0> on a city street under a <asset1>"),
    ("Dog chasing Cat.", ["dog", "cat"], "<asset0> chasing <asset1>."),
])
def test_placeholder_prompt_replaces_whole_words_only(prompt, nouns, want):
    assert placeholder_prompt(prompt, nouns, TOKENS) == want


def test_validate_checks_whole_words_and_the_template():
    masks = torch.zeros(2, 4, 4)
    image = torch.zeros(4, 4, 3)
    with pytest.raises(DynASynError, match="whole word"):
        AugmentedPair(image, "dog playing catch in a park", [0, 1], masks).validate(2, ["dog", "cat"])
    with pytest.raises(DynASynError, match="whole word"):
        AugmentedPair(image, "cat sitting on a box", [0, 1], masks).validate(2, ["cat", "ox"])
    AugmentedPair(image, "cat sitting on a box next to an ox", [0, 1], masks).validate(2, ["cat", "ox"])
    wrong = AugmentedPair(image, "dog chasing cat", [0, 1], masks, {"template": "[1] hugging [2]"})
    with pytest.raises(DynASynError, match="not its template"):
        wrong.validate(2, ["dog", "cat"])
    swapped = AugmentedPair(image, "cat chasing dog", [0, 1], masks, {"template": "[2] chasing [1]"})
    with pytest.raises(DynASynError, match="not those of its template"):
        swapped.validate(2, ["dog", "cat"])


@pytest.fixture(scope="module")
def tokenizer():
    comps = tiny_components(seed=0)
    add_placeholder_tokens(comps.tokenizer, comps.text_encoder, TOKENS, ["dog", "cat"])
    return comps.tokenizer


def _decode(tok, prompt, positions):
    ids = tok(prompt).input_ids
    return [tok.decode([ids[p] for p in ps]).strip() for ps in positions]


def test_prompts_come_from_the_template_markers_even_when_a_noun_is_also_a_prop(tokenizer):
    # "cat" appears first as a prop ("toy cat"); the subject is the one the marker [2] stands for
    pair = AugmentedPair(torch.zeros(4, 4, 3), "cat peeking at a toy dog while dog plays catch", [1, 0],
                         torch.zeros(2, 4, 4), {"template": "[2] peeking at a toy dog while [1] plays catch"})
    pair.validate(2, ["dog", "cat"])
    pp = augmented_prompt_pair(tokenizer, pair, ["dog", "cat"], TOKENS)
    assert pp.placeholder_prompt == "<asset1> peeking at a toy dog while <asset0> plays catch"
    assert pp.class_prompt == pair.class_prompt and pp.subjects == [1, 0]
    assert _decode(tokenizer, pp.placeholder_prompt, pp.placeholder_positions) == ["<asset1>", "<asset0>"]
    assert _decode(tokenizer, pp.class_prompt, pp.class_positions) == ["cat", "dog"]
    ids = tokenizer(pp.class_prompt).input_ids
    dogs = [k for k, t in enumerate(ids) if t == ids[pp.class_positions[1][0]]]
    assert len(dogs) == 2 and pp.class_positions[1] == [dogs[1]]  # the second "dog", not the toy


def test_pairs_whose_prompts_do_not_line_up_are_refused(tokenizer):
    glued = AugmentedPair(torch.zeros(4, 4, 3), "dogs chasing cat", [0, 1], torch.zeros(2, 4, 4),
                          {"template": "[1]s chasing [2]"})
    with pytest.raises(DynASynError, match="does not tokenize on its own"):
        augmented_prompt_pair(tokenizer, glued, ["dog", "cat"], TOKENS)
    long = AugmentedPair(torch.zeros(4, 4, 3), "dog " + "and a ball " * 30 + "cat", [0, 1], torch.zeros(2, 4, 4),
                         {"template": "[1] " + "and a ball " * 30 + "[2]"})
    with pytest.raises(DynASynError, match="longer than"):
        augmented_prompt_pair(tokenizer, long, ["dog", "cat"], TOKENS)


def test_a_dataset_without_templates_still_loads_and_trains_on_whole_words(tmp_path, tokenizer):
    pair = AugmentedPair(torch.zeros(8, 8, 3), "dog playing catch with cat in a park", [0, 1], torch.zeros(2, 8, 8))
    back = load_dataset(save_dataset([pair], tmp_path / "old"))[0]
    pp = augmented_prompt_pair(tokenizer, back, ["dog", "cat"], TOKENS)
    assert pp.placeholder_prompt == "<asset0> playing catch with <asset1> in a park"
    assert _decode(tokenizer, pp.class_prompt, pp.class_positions) == ["dog", "cat"]


def test_trainer_l_aug_uses_the_template_prompts_and_positions(monkeypatch):
    """The maps L_AUG compares are those of the marked subjects, in the order of the pair's masks."""
    image, masks, _ = scene()
    img, aug_masks, _ = scene(seed=5)
    pair = AugmentedPair(img, "cat peeking at a toy dog while dog plays catch", [1, 0], torch.stack(aug_masks[::-1]),
                         {"template": "[2] peeking at a toy dog while [1] plays catch"})
    t = DynASynTrainer(tiny_components(seed=0), image, masks, ["dog", "cat"],
                       TrainConfig(mode="dynasyn", phase1_steps=1, phase2_steps=0, resolution=64, seed=0),
                       augmented=[pair], device="cpu", log=lambda *_: None)
    seen = {}
    real_maps, real_class = t._maps, t._class_maps
    monkeypatch.setattr(t, "_maps", lambda unet, te, store, prompt, *a, **k: seen.setdefault("c", (prompt, a[2]))
                        and real_maps(unet, te, store, prompt, *a, **k))
    monkeypatch.setattr(t, "_class_maps", lambda prompt, noisy, tt, positions: seen.setdefault("hat", (prompt, positions))
                        and real_class(prompt, noisy, tt, positions))
    loss = t._augmentation_term()
    assert torch.isfinite(loss)
    tok = t.c.tokenizer
    prompt, positions = seen["c"]
    assert prompt == "<asset1> peeking at a toy dog while <asset0> plays catch"
    assert _decode(tok, prompt, positions) == ["<asset1>", "<asset0>"]
    prompt, positions = seen["hat"]
    assert prompt == pair.class_prompt
    ids = tok(prompt).input_ids
    dog = tok("dog", add_special_tokens=False).input_ids
    dogs = [k for k, i in enumerate(ids) if [i] == dog]
    assert positions == [[1], [dogs[1]]]  # "cat" first, then the second "dog" (not the toy)


@pytest.mark.parametrize("template, descriptions", [
    # the subject's word also names a prop earlier in the prompt: the marker says which one is the subject
    ("a ball next to a box, the [1] jumping", ["ball"]),
    ("a toy cat beside a box, [1] chasing [2]", ["cat", "dog"]),
    ("a red ball and a cup, [1] chasing [2]", ["cup", "red ball"]),
])
def test_draft_words_come_from_the_template_markers(template, descriptions):
    from dynasyn.drafts import draft_positions
    from dynasyn.prompts import PromptTemplate

    tok, t = tiny_components(seed=0).tokenizer, PromptTemplate(template)
    prompt = t.render(descriptions)
    positions = draft_positions(tok, t, descriptions)
    ids = tok(prompt).input_ids
    assert [tok.decode([ids[p] for p in ps]).strip() for ps in positions] == [descriptions[i] for i in t.subjects]
    props = len(tok(prompt.split(",")[0], add_special_tokens=False).input_ids)  # tokens before the comma: the props
    assert all(p > props + 1 for ps in positions for p in ps)  # past the start token, the props and the comma


def test_render_draft_reads_the_subjects_maps_not_the_props(monkeypatch):
    """The draft's attention per subject is taken at the marker's words (a spy on the map lookup)."""
    from dynasyn import drafts
    from dynasyn.gsa import GSAConfig
    from dynasyn.prompts import PromptTemplate

    comps = tiny_components(seed=0)
    seen = []
    real = drafts.token_maps
    monkeypatch.setattr(drafts, "token_maps", lambda maps, positions: seen.append(positions) or real(maps, positions))
    template = PromptTemplate("a toy cat beside a box, [1] chasing [2]")
    draft = drafts.render_draft(comps, template, ["cat", "dog"], GSAConfig(steps=2, sampler="ddim", seed=0), (64, 64))
    ids = comps.tokenizer(draft.prompt).input_ids
    cat = comps.tokenizer("cat", add_special_tokens=False).input_ids
    cats = [k for k in range(len(ids)) if ids[k:k + len(cat)] == cat]
    assert len(cats) == 2 and seen[-1][0] == list(range(cats[1], cats[1] + len(cat)))  # subject 1 = the second "cat"
    assert draft.attention.shape[0] == 2 and draft.before == ["a toy cat beside a box, ", "a toy cat beside a box, cat chasing "]
