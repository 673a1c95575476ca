"""Training data: the reference image with its subjects, and augmented (image, prompt, pseudo-masks) pairs.

``AugmentedPair`` is what the augmentation stage produces and the trainer consumes (the
``DYNASYN_DATASET`` type in ComfyUI is a list of them): an augmented image, its prompt written
with *class nouns* (ĉ_a), and one pseudo-mask per subject that appears in it.
"""

from __future__ import annotations

import json
import shutil
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
        pairs.append(AugmentedPair(load(e["image"], "RGB"), e["class_prompt"], list(e["subjects"]), masks, e.get("meta", {})))
    return pairs
