"""Training data: the reference image with its subjects, and augmented (image, prompt, pseudo-masks) pairs.

``AugmentedPair`` is what the augmentation stage produces and the trainer consumes (the
``DYNASYN_DATASET`` type in ComfyUI is a list of them): an augmented image, its prompt written
with *class nouns* (ĉ_a), and one pseudo-mask per subject that appears in it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DynASynError
from .prompts import MARKER, PromptTemplate
from .subjects import PromptPair


@dataclass
class AugmentedPair:
    image: torch.Tensor                 # [H, W, 3] in [0, 1] (ComfyUI IMAGE layout, one image)
    class_prompt: str                   # ĉ_a: "a panda jumping into a bowl"
    subjects: list[int]                 # subject index of each mask, in the order the nouns appear
    masks: torch.Tensor                 # [S, H, W] pseudo-masks in [0, 1]
    meta: dict = field(default_factory=dict)

    def validate(self, num_subjects: int, class_nouns: Sequence[str]) -> None:
        if self.image.ndim != 3 or self.image.shape[-1] != 3:
            raise DynASynError(f"An augmented image must be [H, W, 3]; got {tuple(self.image.shape)}.")
        if self.masks.ndim != 3 or self.masks.shape[0] != len(self.subjects):
            raise DynASynError(f"An augmented pair needs one pseudo-mask per listed subject "
                               f"({len(self.subjects)} subjects, masks {tuple(self.masks.shape)}).")
        if tuple(self.masks.shape[-2:]) != tuple(self.image.shape[:2]):
            raise DynASynError("An augmented pair's pseudo-masks must have the image's size.")
        for i in self.subjects:
            if not 0 <= i < num_subjects:
                raise DynASynError(f"Augmented pair refers to subject {i + 1}, but there are {num_subjects} subjects.")
            if not _word(class_nouns[i]).search(self.class_prompt):
                raise DynASynError(f"The augmented prompt {self.class_prompt!r} does not contain the class noun "
                                   f"{class_nouns[i]!r} of subject {i + 1} as a whole word.")
        if self.meta.get("template") is not None:
            template = PromptTemplate(str(self.meta["template"]))
            if template.subjects != list(self.subjects):
                raise DynASynError(f"The augmented pair's subjects {[i + 1 for i in self.subjects]} are not those of its "
                                   f"template {template.text!r}.")
            if template.render(class_nouns).lower() != self.class_prompt.lower():
                raise DynASynError(f"The augmented prompt {self.class_prompt!r} is not its template {template.text!r} "
                                   f"written with the class nouns ({', '.join(class_nouns)}).")


def _word(phrase: str) -> re.Pattern:
    """``phrase`` as whole words: 'cat' matches in 'a cat.' but not in 'catch' or 'bobcat'."""
    return re.compile(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", re.IGNORECASE)


def pair_template(pair: AugmentedPair, class_nouns: Sequence[str]) -> PromptTemplate:
    """The pair's prompt template: ``meta["template"]`` (written by the augmentation stage).

    Older datasets have no template: it is rebuilt from ĉ_a, each subject (in ``pair.subjects``
    order) at the first whole-word occurrence of its class noun after the previous one.
    """
    if pair.meta.get("template") is not None:
        return PromptTemplate(str(pair.meta["template"]))
    text, out, cursor = pair.class_prompt, [], 0
    for i in pair.subjects:
        m = _word(class_nouns[i]).search(text, cursor)
        if m is None:
            raise DynASynError(f"{class_nouns[i]!r} is not a whole word of the augmented prompt {text!r} (after "
                               f"{text[:cursor]!r}).")
        out.append(text[cursor:m.start()].replace("[", "(").replace("]", ")") + f"[{i + 1}]")
        cursor = m.end()
    return PromptTemplate("".join(out) + text[cursor:].replace("[", "(").replace("]", ")"))


def placeholder_prompt(class_prompt: str, nouns: Sequence[str], tokens: Sequence[str]) -> str:
    """c_a from ĉ_a without a template: each noun's first whole-word occurrence after the previous one
    becomes its placeholder (pairs made by the augmentation stage use ``pair_template`` instead)."""
    pair = AugmentedPair(torch.zeros(1, 1, 3), class_prompt, list(range(len(nouns))), torch.zeros(len(nouns), 1, 1))
    return pair_template(pair, nouns).render(tokens)


def marker_positions(tokenizer, template: PromptTemplate, names: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The template written with ``names`` (one per subject index) tokenized, and the token positions
    (start token at 0) of each marker's words, by marker order (never by searching for the words)."""
    from .subjects import word_ids

    text = template.render(names)
    ids = tokenizer(text).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise DynASynError(f"The prompt {text!r} is longer than {tokenizer.model_max_length} tokens; shorten it.")
    positions = []
    for m in MARKER.finditer(template.text):
        before = PromptTemplate(template.text[:m.start()]).render(names)
        name = names[int(m.group(1)) - 1]
        a, b = len(word_ids(tokenizer, before)), word_ids(tokenizer, before + name)
        if b != ids[1:1 + len(b)] or b[a:] != word_ids(tokenizer, name) or not b[a:]:
            raise DynASynError(f"{name!r} does not tokenize on its own in {text!r} (it merges with the text next to "
                               "it); write the subject as a separate word.")
        positions.append(list(range(1 + a, 1 + len(b))))
    return ids, positions


def augmented_prompt_pair(tokenizer, pair: AugmentedPair, class_nouns: Sequence[str], tokens: Sequence[str]) -> PromptPair:
    """c_a (placeholders) and ĉ_a (class nouns) of an augmented pair from its template, with each
    subject's token positions in both, in ``pair.subjects`` order (the order of ``pair.masks``).

    Refuses a pair whose two prompts do not line up: the same subjects in the same order, and the
    same tokens around them.
    """
    template = pair_template(pair, class_nouns)
    if template.subjects != list(pair.subjects):
        raise DynASynError(f"The augmented prompt {pair.class_prompt!r} names its subjects in another order than the "
                           f"pair lists them ({[i + 1 for i in pair.subjects]}).")
    c_ids, c_pos = marker_positions(tokenizer, template, tokens)
    hat_ids, hat_pos = marker_positions(tokenizer, template, class_nouns)

    def context(ids, positions):
        inside = {p for ps in positions for p in ps}
        return [t for k, t in enumerate(ids) if k not in inside]

    if len(c_pos) != len(hat_pos) or context(c_ids, c_pos) != context(hat_ids, hat_pos):
        raise DynASynError(f"The placeholder and class-noun prompts of {pair.class_prompt!r} do not line up; the pair "
                           "cannot train L_AUG.")
    if template.render(class_nouns).lower() != pair.class_prompt.lower():
        raise DynASynError(f"The augmented prompt {pair.class_prompt!r} is not its template {template.text!r} written with "
                           f"the class nouns ({', '.join(class_nouns)}).")
    return PromptPair(template.render(tokens), pair.class_prompt, c_pos, hat_pos, list(pair.subjects))


INDEX = "dataset.json"


def save_dataset(pairs: Sequence[AugmentedPair], folder) -> Path:
    """Images and masks as PNG plus ``dataset.json``, written to a temporary folder renamed into place."""
    from PIL import Image

    folder = Path(folder)
    if folder.exists():
        raise DynASynError(f"{folder} already exists; a dataset is never overwritten: choose a new name.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    to8 = lambda x: (x.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)  # noqa: E731
    try:
        entries = []
        for k, p in enumerate(pairs):
            Image.fromarray(to8(p.image)).save(tmp / f"{k:04d}.png")
            names = []
            for j, m in enumerate(p.masks):
                names.append(f"{k:04d}_mask{j}.png")
                Image.fromarray(to8(m.float())).save(tmp / names[-1])
            meta = {key: v for key, v in p.meta.items() if not isinstance(v, torch.Tensor)}
            mask_sets = {}  # meta's mask tensors (the pasted and the re-segmented pseudo-masks) as PNGs too
            for key, v in p.meta.items():
                if isinstance(v, torch.Tensor):
                    mask_sets[key] = [f"{k:04d}_{key}{j}.png" for j in range(len(v))]
                    for name, m in zip(mask_sets[key], v):
                        Image.fromarray(to8(m.float())).save(tmp / name)
            entries.append({"image": f"{k:04d}.png", "class_prompt": p.class_prompt, "subjects": list(p.subjects),
                            "masks": names, "meta": meta, **({"mask_sets": mask_sets} if mask_sets else {})})
        (tmp / INDEX).write_text(json.dumps({"version": 1, "pairs": entries}, indent=1), encoding="utf-8")
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_dataset(folder) -> list[AugmentedPair]:
    from PIL import Image

    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise DynASynError(f"{folder} holds no {INDEX}: point to a folder written by DynASyn Save Dataset.")
    data = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    load = lambda name, mode: torch.from_numpy(np.asarray(Image.open(folder / name).convert(mode), dtype=np.float32) / 255)  # noqa: E731
    pairs = []
    for e in data["pairs"]:
        masks = torch.stack([load(n, "L") for n in e["masks"]]) if e["masks"] else torch.zeros(0, 1, 1)
        meta = {**e.get("meta", {}), **{key: torch.stack([load(n, "L") for n in names])
                                        for key, names in e.get("mask_sets", {}).items()}}
        pairs.append(AugmentedPair(load(e["image"], "RGB"), e["class_prompt"], list(e["subjects"]), masks, meta))
    return pairs
