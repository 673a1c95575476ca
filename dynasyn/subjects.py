"""Subjects, placeholder tokens and the two prompts (c with placeholders, ĉ with class nouns).

Each subject is a mask on the reference image, a class noun ("panda") and a placeholder token
(``<asset0>``) added to the tokenizer and text encoder, initialised from the class noun's
embedding. Prompts with placeholders and with class nouns come from one template, so the token
positions of every subject are known in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import DynASynError

MAX_SUBJECTS = 8
DEFAULT_TEMPLATE = "a photo of {}"
PLACEHOLDER_FORMAT = "<asset{}>"


@dataclass
class Subject:
    mask: torch.Tensor       # [H, W] in [0, 1]
    class_noun: str          # "panda", "green bowl"
    token: str               # "<asset0>"


def validate_subjects(image_size: tuple[int, int], masks: Sequence[torch.Tensor], class_nouns: Sequence[str],
                      min_pixels: int = 16, max_coverage: float = 0.995, max_iou: float = 0.9) -> None:
    """Refuse inputs that cannot train, each with a message that says what to change."""
    n = len(masks)
    if n == 0:
        raise DynASynError("No subjects: give one mask per subject (a MASK batch, 1 to 8 masks).")
    if n > MAX_SUBJECTS:
        raise DynASynError(f"{n} subjects given; DynASyn trains 1 to {MAX_SUBJECTS} subjects per image. Merge or drop masks.")
    if len(class_nouns) != n:
        raise DynASynError(f"{n} masks but {len(class_nouns)} class nouns: give one class noun per mask "
                           "(comma-separated, in mask order, e.g. 'panda, bowl').")
    h, w = image_size
    for i, (m, noun) in enumerate(zip(masks, class_nouns)):
        if not noun or not noun.strip():
            raise DynASynError(f"Subject {i + 1} has an empty class noun; name what it is, e.g. 'dog' or 'toy bear'.")
        if tuple(m.shape[-2:]) != (h, w):
            raise DynASynError(f"Mask {i + 1} is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}; "
                               "masks must have the image's size (resize the mask or make it from this image).")
        if not torch.isfinite(m).all():
            raise DynASynError(f"Mask {i + 1} contains NaN or infinite values.")
        area = int((m > 0.5).sum())
        if area < min_pixels:
            raise DynASynError(f"Mask {i + 1} ({noun}) is empty (fewer than {min_pixels} pixels); paint the subject "
                               "in the mask editor or make the mask with DynASyn SAM Masks.")
        if area >= max_coverage * h * w:
            raise DynASynError(f"Mask {i + 1} ({noun}) covers the whole image; a subject mask must select only that "
                               "subject (check that the mask is not inverted).")
    binary = [m > 0.5 for m in masks]
    for i in range(n):
        for j in range(i + 1, n):
            inter = (binary[i] & binary[j]).sum().item()
            union = (binary[i] | binary[j]).sum().item()
            if union and inter / union > max_iou:
                raise DynASynError(f"Masks {i + 1} and {j + 1} cover nearly the same pixels (IoU {inter / union:.2f}); "
                                   "each subject needs its own mask.")


def placeholder_tokens(n: int, fmt: str = PLACEHOLDER_FORMAT) -> list[str]:
    return [fmt.format(i) for i in range(n)]


def word_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without start/end tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def add_placeholder_tokens(tokenizer, text_encoder, tokens: Sequence[str], class_nouns: Sequence[str]) -> list[int]:
    """Add ``tokens`` and initialise each embedding row with the mean of its class noun's token rows."""
    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise DynASynError(f"The tokenizer already knows {existing}; choose other placeholder names.")
    if tokenizer.add_tokens(list(tokens)) != len(tokens):
        raise DynASynError(f"Could not add the placeholder tokens {list(tokens)} to the tokenizer.")
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tid, noun in zip(ids, class_nouns):
            src = word_ids(tokenizer, noun)
            if not src:
                raise DynASynError(f"The class noun {noun!r} gives no tokens; use a plain word such as 'dog'.")
            emb[tid] = emb[src].mean(dim=0)  # multi-token nouns ("teddy bear"): mean of their rows
    return ids


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def token_positions(tokenizer, prompt: str, words: Sequence[str], before: Sequence[str] | None = None) -> list[list[int]]:
    """Positions of each of ``words`` (in order) in the tokenized ``prompt`` (start token at 0). ``before``: the
    text of ``prompt`` before each word (``PromptTemplate.before_markers``); each is searched from there on."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    starts = None if before is None else [1 + len(word_ids(tokenizer, b)) for b in before]
    return phrase_positions(ids, [word_ids(tokenizer, w) for w in words], words, prompt, tokenizer.model_max_length,
                            starts)


def phrase_positions(ids: Sequence[int], phrases: Sequence[Sequence[int]], words: Sequence[str], prompt: str,
                     max_length: int = 77, starts: Sequence[int] | None = None) -> list[list[int]]:
    """Positions of each token sequence in ``phrases`` in ``ids``, searched in order (any tokenizer); with
    ``starts``, phrase k is searched from index ``starts[k]`` on (where the text before it ends)."""
    ids = list(ids)
    out, cursor = [], 0
    for k, (w, sub) in enumerate(zip(words, phrases)):
        sub = list(sub)
        if starts is not None:
            cursor = max(cursor, starts[k])
        at = _find(ids, sub, cursor) if sub else -1
        if at < 0:
            raise DynASynError(f"{w!r} is not in the prompt {prompt!r} (or the prompt is longer than "
                               f"{max_length} tokens).")
        out.append(list(range(at, at + len(sub))))
        cursor = at + len(sub)
    return out


@dataclass
class PromptPair:
    placeholder_prompt: str              # c:  "a photo of <asset0> and <asset1>"
    class_prompt: str                    # ĉ:  "a photo of panda and bowl"
    placeholder_positions: list[list[int]]
    class_positions: list[list[int]]
    subjects: list[int]                  # subject indices, in prompt order


def make_prompt_pair(tokenizer, subjects: Sequence[Subject], subset: Sequence[int],
                     template: str = DEFAULT_TEMPLATE) -> PromptPair:
    """c and ĉ for the chosen subjects from one template ("a photo of {}" -> "... X and Y")."""
    if "{}" not in template:
        raise DynASynError(f"The prompt template {template!r} needs a '{{}}' where the subjects go.")
    subset = list(subset)
    c = template.format(" and ".join(subjects[i].token for i in subset))
    c_hat = template.format(" and ".join(subjects[i].class_noun for i in subset))
    return PromptPair(c, c_hat,
                      token_positions(tokenizer, c, [subjects[i].token for i in subset]),
                      token_positions(tokenizer, c_hat, [subjects[i].class_noun for i in subset]),
                      subset)
