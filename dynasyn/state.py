"""What makes a saved training state safe to resume: an input fingerprint and an ownership marker.

* ``input_fingerprint`` hashes what a run was started from (picture, subject masks, class nouns,
  base model, the settings that change what is trained). A resume from a state whose fingerprint
  differs is refused with a message naming the inputs that changed, so a queue with another
  picture, another checkpoint or other settings never continues the wrong run.
* ``MARKER`` is a file every state folder the trainer writes carries; ``remove_owned`` deletes a
  folder only when it carries it, so a name that happens to point at something else (a dataset, a
  user's folder) is never deleted.
* Versions: a state folder holds complete versions (``v<step>-<id>/``: weights, optimizer, RNG) and
  ``state.json``, the pointer naming the current one (with the run's metadata). ``write_version``
  writes a new version into a temporary folder, renames it into place, then switches the pointer
  with one atomic rename; only then does the previous version go. A crash or a full disk at any
  moment leaves the pointer on a complete version; ``sweep`` removes what an interrupted save left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import DynASynError

MARKER = ".dynasyn_state"
FINGERPRINT_VERSION = 1
# settings that only change how long or with how much memory training runs, not what it trains
RESUMABLE_CHANGES = frozenset({"phase2_steps", "gradient_checkpointing", "save_every", "precompute_targets"})
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


# ---------------------------------------------------------------------------------------------- versions
POINTER = "state.json"      # names the current version; the node and the CLI test for it before resuming
STATE_FORMAT = 2            # 1 (no "data" key): the weights lay beside state.json, read but never written
TMP_PREFIX = ".tmp-"        # versions and pointers being written; anything so named is a leftover at start
VERSION_RE = re.compile(r"^v\d{8,}-[a-z0-9_]+$")
LEGACY_FILES = ("unet.safetensors", "text_encoder.safetensors", "trainer.pt")
FREE_SPACE_MARGIN = 64 * 2**20


class StateNotSaved(DynASynError):
    """A state could not be written; the previous version (if any) is still the current one."""


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush to the disk, so that the pointer never names a version whose files a power cut could lose."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # directories cannot be opened on Windows: the rename there is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """A leftover, never followed: a link is unlinked, not its target emptied."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_pointer(folder: str | Path) -> dict:
    """The metadata of the current version (``state.json``); DynASynError when missing or unreadable."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / POINTER).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        raise DynASynError(f"The saved state in {folder} is unreadable ({type(e).__name__}); turn 'resume' off.") from None
    return meta


def version_folder(folder: str | Path, meta: dict) -> Path:
    """Where the current version's files are: the folder the pointer names, validated (a name of ours, a real
    folder inside ``folder``, no link), or ``folder`` itself for a state of format 1."""
    folder = Path(folder)
    if "data" not in meta:
        return folder
    name = meta["data"]
    path = folder / name if isinstance(name, str) and VERSION_RE.match(name) else None
    if path is None or path.is_symlink() or not path.is_dir():
        raise DynASynError(f"The saved state in {folder} names a version ({name!r}) that is not there; delete the "
                           "folder or turn 'resume' off.")
    return path


def current_version(folder: str | Path) -> Path:
    """The folder holding the files of the state ``folder``'s pointer names."""
    return version_folder(folder, read_pointer(folder))


def has_state(folder: str | Path) -> bool:
    """Whether ``folder`` holds a state to resume from (a marked folder with its pointer)."""
    return is_owned(folder) and (Path(folder) / POINTER).is_file()


def sweep(folder: str | Path) -> list[str]:
    """Remove what interrupted saves left in a state folder: temporary versions and pointers, versions the pointer
    does not name (an older one whose removal was cut short, a new one whose pointer was never written), the files
    of a format-1 state once a newer version replaced it, and the siblings the first format's save left. Only in a
    folder carrying the marker; returns the names removed."""
    folder = Path(folder)
    removed = []
    for sibling in [folder.with_name(folder.name + ".old"), *folder.parent.glob(f".{folder.name}.*")]:
        if remove_owned(sibling):  # format 1 wrote the whole folder beside it, then renamed it
            removed.append(sibling.name)
    if not is_owned(folder):
        return removed
    current = None
    if (folder / POINTER).is_file():
        try:
            current = read_pointer(folder).get("data")
        except DynASynError:
            current = False  # unreadable: keep every version, remove only temporary files
    for entry in sorted(folder.iterdir()):
        stale = entry.name.startswith(TMP_PREFIX)
        stale |= current is not False and bool(VERSION_RE.match(entry.name)) and entry.name != current
        stale |= isinstance(current, str) and entry.name in LEGACY_FILES
        if stale:
            _remove(entry)
            removed.append(entry.name)
    return removed


def check_free_space(folder: str | Path, needed: int, what: str = "the training state") -> None:
    """Refuse before writing ``needed`` bytes into ``folder`` (which must exist) when the disk has less free."""
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_SPACE_MARGIN:
        raise StateNotSaved(f"Not enough free disk space to write {what} into {folder}: it needs about "
                            f"{needed + FREE_SPACE_MARGIN:,} bytes ({(needed + FREE_SPACE_MARGIN) / 2**30:.2f} GiB), "
                            f"{free:,} bytes are free. Free some space on that disk (the previous state, if any, "
                            "is kept).")


def _prepare(folder: Path) -> None:
    if folder.exists() or folder.is_symlink():
        if not is_owned(folder):
            raise StateNotSaved(f"{folder} exists and is not a DynASyn training state; it is left alone: "
                                "choose another run_name.")
        return
    folder.mkdir(parents=True)
    mark(folder)


def write_version(folder: str | Path, meta: dict, write: Callable[[Path], None], needed_bytes: int) -> Path:
    """Write a new version of the state in ``folder`` and make it the current one; returns its path.

    ``write(path)`` writes the version's files into the (temporary) folder ``path``; ``meta`` (JSON) goes into
    the pointer with the version's name. The previous version stays the current one until the new one is
    complete and flushed, whatever happens (an exception in ``write``, a full disk, a kill): the switch is one
    atomic rename of the pointer. ``needed_bytes``: the version's size, checked against the free space first.
    """
    folder = Path(folder)
    try:
        _prepare(folder)
        sweep(folder)  # a leftover of an interrupted save would take space the new version needs
        check_free_space(folder, needed_bytes)
    except OSError as e:
        raise StateNotSaved(f"Could not prepare {folder} for the training state ({e}).") from e
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}v{int(meta['step']):08d}-", dir=folder))
    version = folder / tmp.name[len(TMP_PREFIX):]
    pointer_tmp = None
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        tmp.rename(version)
        _fsync(folder, directory=True)
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".json", dir=folder)
        pointer_tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**meta, "format": STATE_FORMAT, "data": version.name}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, folder / POINTER)  # the switch
        _fsync(folder, directory=True)
    except BaseException as e:
        for leftover in (tmp, pointer_tmp):
            if leftover is not None:
                _remove(leftover)
        if not _names_current(folder, version.name):
            _remove(version)
        if isinstance(e, OSError):
            raise StateNotSaved(f"Could not write the training state into {folder} ({type(e).__name__}: {e}); the "
                                "previous state, if any, is kept.") from e
        raise
    sweep(folder)  # the new version is current: the previous one goes
    return version


def _names_current(folder: Path, name: str) -> bool:
    try:
        return read_pointer(folder).get("data") == name
    except DynASynError:
        return False
