import pytest
import torch

from dynasyn.errors import DynASynError
from dynasyn.subjects import (Subject, add_placeholder_tokens, make_prompt_pair, placeholder_tokens, token_positions,
                              validate_subjects)
from dynasyn.tiny import tiny_components


def masks_2():
    a = torch.zeros(64, 64)
    a[8:30, 8:30] = 1
    b = torch.zeros(64, 64)
    b[34:60, 30:60] = 1
    return [a, b]


def test_good_subjects_pass():
    validate_subjects((64, 64), masks_2(), ["panda", "bowl"])


@pytest.mark.parametrize("case, match", [
    ("empty", "is empty"), ("size", "masks must have the image's size"), ("full", "covers the whole image"),
    ("same", "cover nearly the same pixels"), ("none", "No subjects"), ("nine", "1 to 8 subjects"),
    ("noun", "empty class noun"), ("count", "one class noun per mask"), ("nan", "NaN"),
])
def test_bad_subjects_get_clear_errors(case, match):
    masks, nouns = masks_2(), ["panda", "bowl"]
    if case == "empty":
        masks[1] = torch.zeros(64, 64)
    elif case == "size":
        masks[0] = torch.ones(32, 32)
    elif case == "full":
        masks = [torch.ones(64, 64), masks[1]]
    elif case == "same":
        masks = [masks[0], masks[0].clone()]
    elif case == "none":
        masks, nouns = [], []
    elif case == "nine":
        masks, nouns = [masks[0]] * 9, ["x"] * 9
    elif case == "noun":
        nouns = ["panda", "  "]
    elif case == "count":
        nouns = ["panda"]
    elif case == "nan":
        masks[0] = masks[0].clone()
        masks[0][0, 0] = float("nan")
    with pytest.raises(DynASynError, match=match):
        validate_subjects((64, 64), masks, nouns)


def test_placeholders_are_added_and_initialised_from_class_nouns():
    comps = tiny_components(seed=0)
    tok, te = comps.tokenizer, comps.text_encoder
    tokens = placeholder_tokens(2)
    before = te.get_input_embeddings().weight.detach().clone()
    ids = add_placeholder_tokens(tok, te, tokens, ["panda", "green bowl"])
    emb = te.get_input_embeddings().weight
    assert ids == [len(tok) - 2, len(tok) - 1] and emb.shape[0] == len(tok)
    panda = tok("panda", add_special_tokens=False).input_ids
    bowl = tok("green bowl", add_special_tokens=False).input_ids
    assert len(panda) == 1 and len(bowl) == 2
    torch.testing.assert_close(emb[ids[0]], before[panda[0]])
    torch.testing.assert_close(emb[ids[1]], before[bowl].mean(0))
    assert tok("a photo of <asset1>").input_ids[-2] == ids[1]
    with pytest.raises(DynASynError, match="already knows"):
        add_placeholder_tokens(tok, te, tokens, ["panda", "bowl"])


def test_prompt_pair_and_token_positions():
    comps = tiny_components(seed=0)
    tok = comps.tokenizer
    subjects = [Subject(m, n, t) for m, n, t in zip(masks_2(), ["panda", "green bowl"], placeholder_tokens(2))]
    add_placeholder_tokens(tok, comps.text_encoder, [s.token for s in subjects], [s.class_noun for s in subjects])
    pair = make_prompt_pair(tok, subjects, [1, 0])
    assert pair.placeholder_prompt == "a photo of <asset1> and <asset0>"
    assert pair.class_prompt == "a photo of green bowl and panda"
    ids_c = tok(pair.placeholder_prompt).input_ids
    assert [ids_c[p[0]] for p in pair.placeholder_positions] == tok.convert_tokens_to_ids(["<asset1>", "<asset0>"])
    ids_h = tok(pair.class_prompt).input_ids
    assert [[ids_h[i] for i in p] for p in pair.class_positions] == [
        tok("green bowl", add_special_tokens=False).input_ids, tok("panda", add_special_tokens=False).input_ids]
    with pytest.raises(DynASynError, match="is not in the prompt"):
        token_positions(tok, "a photo of a dog", ["cat"])
