"""What makes a saved training state safe to resume: an input fingerprint and an ownership marker.

* ``input_fingerprint`` hashes what a run was started from (picture, subject masks, class nouns,
  base model, the settings that change what is trained). A resume from a state whose fingerprint
  differs is refused with a message naming the inputs that changed, so a queue with another
  picture, another checkpoint or other settings never continues the wrong run.
* ``MARKER`` is a file every state folder the trainer writes carries; ``remove_owned`` deletes a
  folder only when it carries it, so a name that happens to point at something else (a dataset, a
  user's folder) is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .errors import DynASynError

MARKER = ".dynasyn_state"
FINGERPRINT_VERSION = 1
# settings that only change how long or with how much memory training runs, not what it trains
RESUMABLE_CHANGES = frozenset({"phase2_steps", "gradient_checkpointing"})
_SAMPLES_PER_TENSOR = 4096


def _tensor_hash(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())


def _model_hash(modules: Sequence[torch.nn.Module]) -> str:
    """Every tensor's name, shape and dtype, and an evenly strided sample of its values (4096 per tensor):
    a different checkpoint (or a fine-tune of the same one) differs in practically every tensor, and the
    sample keeps this to a fraction of a second for a full SD model."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            flat = t.detach().reshape(-1)
            stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            h.update(name.encode())
            _tensor_hash(h, flat[::stride][:_SAMPLES_PER_TENSOR])
            h.update(f"|{flat.numel()}".encode())
    return h.hexdigest()


def _hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        _tensor_hash(h, torch.as_tensor(t))
    return h.hexdigest()


def config_for_fingerprint(config) -> dict:
    return {k: v for k, v in sorted(asdict(config).items()) if k not in RESUMABLE_CHANGES}


def input_fingerprint(modules: Sequence[torch.nn.Module], image: torch.Tensor, masks: Sequence[torch.Tensor],
                      class_nouns: Sequence[str], config) -> dict:
    """Hashes of each input of a run; call it on the base weights, before any training step."""
    cfg = config_for_fingerprint(config)
    return {
        "version": FINGERPRINT_VERSION,
        "picture": _hash(image),
        "masks": _hash(*masks),
        "class_nouns": hashlib.sha256(json.dumps([n.strip() for n in class_nouns]).encode()).hexdigest(),
        "base_model": _model_hash(modules),
        "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
        "config_values": cfg,
    }


LABELS = {"picture": "the reference picture", "masks": "the subject masks", "class_nouns": "the class nouns",
          "base_model": "the base model (MODEL / CLIP)", "config": "the training settings"}


def check_fingerprint(saved: dict | None, current: dict, folder) -> None:
    """Refuse to resume from ``folder`` unless every input matches; the message names what changed."""
    if not isinstance(saved, dict) or saved.get("version") != FINGERPRINT_VERSION:
        raise DynASynError(f"The saved state in {folder} has no input fingerprint (an older or foreign state), so it "
                           "cannot be checked against this run: turn 'resume' off or choose another run_name.")
    changed = [key for key in LABELS if saved.get(key) != current[key]]
    if not changed:
        return
    what = [LABELS[k] for k in changed]
    if "config" in changed:
        old, new = saved.get("config_values") or {}, current["config_values"]
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if keys:
            what[changed.index("config")] += " (" + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) + ")"
    raise DynASynError(f"The saved state in {folder} was made from other inputs: {'; '.join(what)} changed. "
                       "Resuming would continue a different run: queue with the original inputs, or turn 'resume' "
                       "off (or choose another run_name) to start afresh.")


def mark(folder: str | Path) -> None:
    (Path(folder) / MARKER).write_text("DynASyn resumable training state; safe to delete.\n", encoding="utf-8")


def is_owned(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def remove_owned(folder: str | Path) -> bool:
    """Delete ``folder`` only if it is a real folder carrying ``MARKER``; returns whether it was deleted."""
    if not is_owned(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
