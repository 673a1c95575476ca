"""Training data: the reference image with its subjects, and augmented (image, prompt, pseudo-masks) pairs.

``AugmentedPair`` is what the augmentation stage produces and the trainer consumes (the
``DYNASYN_DATASET`` type in ComfyUI is a list of them): an augmented image, its prompt written
with *class nouns* (ĉ_a), and one pseudo-mask per subject that appears in it.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
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


MAX_INDEX_BYTES = 16 * 2**20      # dataset.json
MAX_PAIRS = 10000
MAX_PIXELS = 4096 * 4096          # per image or mask
MAX_SUBJECTS = 16
_MASK_SET_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.png")


def _bad(name: str, why: str) -> DynASynError:
    return DynASynError(f"The dataset {name!r} is not a valid DynASyn dataset: {why}. Write it again with DynASyn Save Dataset.")


def _regular_file(folder: Path, entry, label: str, what: str) -> Path:
    """``folder/entry`` when ``entry`` is a plain PNG file name and the file is a regular file inside ``folder``."""
    if not isinstance(entry, str) or not _ENTRY_NAME.fullmatch(entry) or ".." in entry:
        raise _bad(label, f"{what} is not a plain .png file name of the dataset folder")
    path = folder / entry
    try:
        st = path.lstat()
    except OSError:
        raise _bad(label, f"{what} {entry!r} is missing") from None
    if not stat.S_ISREG(st.st_mode) or path.resolve().parent != folder.resolve():
        raise _bad(label, f"{what} {entry!r} is not a regular file inside the dataset folder")
    return path


def _read_png(path: Path, mode: str, label: str, max_pixels: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path, formats=["PNG"]) as img:
            if img.width * img.height > max_pixels:
                raise _bad(label, f"{path.name} has {img.width}x{img.height} pixels (at most {max_pixels} allowed)")
            arr = np.asarray(img.convert(mode), dtype=np.float32) / 255
    except DynASynError:
        raise
    except Exception:  # noqa: BLE001 - not a PNG, truncated, decompression bomb...
        raise _bad(label, f"{path.name} is not a readable PNG image") from None
    return torch.from_numpy(arr)


def _check_index(data, label: str) -> list[dict]:
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("pairs"), list):
        raise _bad(label, f"{INDEX} must be an object with version 1 and a list of pairs")
    pairs = data["pairs"]
    if len(pairs) > MAX_PAIRS:
        raise _bad(label, f"{INDEX} lists {len(pairs)} pairs (at most {MAX_PAIRS})")
    for k, e in enumerate(pairs):
        ok = (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("class_prompt"), str)
              and len(e["class_prompt"]) <= 2000 and isinstance(e.get("subjects"), list)
              and isinstance(e.get("masks"), list) and len(e["masks"]) == len(e["subjects"]) <= MAX_SUBJECTS
              and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_SUBJECTS for i in e["subjects"])
              and all(isinstance(n, str) for n in e["masks"]) and isinstance(e.get("meta", {}), dict)
              and isinstance(e.get("mask_sets", {}), dict)
              and all(isinstance(key, str) and _MASK_SET_KEY.fullmatch(key) and isinstance(names, list)
                      and len(names) == len(e["subjects"]) and all(isinstance(n, str) for n in names)
                      for key, names in e.get("mask_sets", {}).items()))
        if not ok:
            raise _bad(label, f"pair {k + 1} of {INDEX} does not have the expected fields (image, class_prompt, "
                              "subjects, masks, meta)")
    return pairs


def load_dataset(folder, *, max_pixels: int = MAX_PIXELS) -> list[AugmentedPair]:
    """Read a dataset written by ``save_dataset``, trusting nothing in it.

    Every file ``dataset.json`` names must be a plain ``.png`` name of a regular file directly inside
    ``folder`` (no path, no ``..``, no symlink); images are decoded as PNG only and capped at
    ``max_pixels``; the index is checked field by field. Nothing is unpickled. Errors name the dataset
    folder's own entries only.
    """
    folder = Path(folder)
    label = folder.name
    if folder.is_symlink() or not folder.is_dir():
        raise DynASynError(f"There is no dataset folder {label!r}: write one with DynASyn Save Dataset.")
    index = folder / INDEX
    try:
        st = index.lstat()
    except OSError:
        raise DynASynError(f"The folder {label!r} holds no {INDEX}: point to a folder written by DynASyn Save Dataset.") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
        raise _bad(label, f"{INDEX} is not a regular file of at most {MAX_INDEX_BYTES} bytes")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise _bad(label, f"{INDEX} is not valid JSON") from None
    pairs = []
    for k, e in enumerate(_check_index(data, label)):
        image = _read_png(_regular_file(folder, e["image"], label, f"pair {k + 1}'s image"), "RGB", label, max_pixels)
        masks = [_read_png(_regular_file(folder, n, label, f"pair {k + 1}'s mask"), "L", label, max_pixels)
                 for n in e["masks"]]
        if any(tuple(m.shape) != tuple(image.shape[:2]) for m in masks):
            raise _bad(label, f"pair {k + 1}'s masks do not have its image's size")
        stacked = torch.stack(masks) if masks else torch.zeros(0, *image.shape[:2])
        meta = dict(e.get("meta", {}))
        for key, names in e.get("mask_sets", {}).items():  # the pasted and re-segmented pseudo-masks, kept for inspection
            extra = [_read_png(_regular_file(folder, n, label, f"pair {k + 1}'s {key}"), "L", label, max_pixels) for n in names]
            if any(tuple(m.shape) != tuple(image.shape[:2]) for m in extra):
                raise _bad(label, f"pair {k + 1}'s {key} do not have its image's size")
            meta[key] = torch.stack(extra) if extra else torch.zeros(0, *image.shape[:2])
        pairs.append(AugmentedPair(image, e["class_prompt"], list(e["subjects"]), stacked, meta))
    return pairs
