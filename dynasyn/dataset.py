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
            if class_nouns[i].lower() not in self.class_prompt.lower():
                raise DynASynError(f"The augmented prompt {self.class_prompt!r} does not contain the class noun "
                                   f"{class_nouns[i]!r} of subject {i + 1}.")


def placeholder_prompt(class_prompt: str, nouns: Sequence[str], tokens: Sequence[str]) -> str:
    """c_a from ĉ_a: each noun's first occurrence after the previous one becomes its placeholder."""
    out, rest = [], class_prompt
    for noun, token in zip(nouns, tokens):
        at = rest.lower().find(noun.lower())
        if at < 0:
            raise DynASynError(f"{noun!r} is not in the augmented prompt {class_prompt!r}.")
        out.append(rest[:at] + token)
        rest = rest[at + len(noun):]
    return "".join(out) + rest


def ordered_by_prompt(pair: AugmentedPair, class_nouns: Sequence[str]) -> list[int]:
    """Indices into ``pair.subjects`` sorted by where each subject's noun occurs in the prompt."""
    low = pair.class_prompt.lower()
    return sorted(range(len(pair.subjects)), key=lambda k: low.find(class_nouns[pair.subjects[k]].lower()))


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
            entries.append({"image": f"{k:04d}.png", "class_prompt": p.class_prompt, "subjects": list(p.subjects),
                            "masks": names, "meta": p.meta})
        (tmp / INDEX).write_text(json.dumps({"version": 1, "pairs": entries}, indent=1), encoding="utf-8")
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


MAX_INDEX_BYTES = 16 * 2**20      # dataset.json
MAX_PAIRS = 10000
MAX_PIXELS = 4096 * 4096          # per image or mask
MAX_SUBJECTS = 16
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
              and all(isinstance(n, str) for n in e["masks"]) and isinstance(e.get("meta", {}), dict))
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
        pairs.append(AugmentedPair(image, e["class_prompt"], list(e["subjects"]), stacked, e.get("meta", {})))
    return pairs
