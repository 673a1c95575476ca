"""Exports ComfyUI's stock nodes read: textual-inversion embeddings, atomic file writes and byte-reproducible
safetensors files.

Embedding files follow the A1111/kohya layout ComfyUI's ``load_embed`` accepts:
``{"emb_params": Tensor[n, dim]}`` in a ``.safetensors`` file, used as ``embedding:<name>``
in a stock CLIPTextEncode. Every write goes to a temporary file in the target folder and is
renamed into place only when complete, never replacing an existing file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .errors import ExportWriteError, InvalidNameError, TargetExistsError

# ComfyUI splits prompts on whitespace, "," and the weight syntax "(...:1.2)"; the embedding
# lookup strips "," and rejects paths outside the folder. Windows forbids <>:"/\|?* in names.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_NAME_LENGTH = 100


def validate_export_name(name: str, what: str = "export") -> str:
    """Return ``name`` if it is safe as a file stem and as ``embedding:<name>``; raise otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError(f"The {what} name is empty: give a name such as 'my_subjects'.")
    reason = None
    if "/" in name or "\\" in name:
        reason = "it contains a path separator ('/' or '\\'); give a plain name, not a path"
    elif ".." in name:
        reason = "it contains '..'"
    elif any(c.isspace() for c in name):
        reason = "it contains whitespace, which ends an 'embedding:' name in a prompt"
    elif len(name) > MAX_NAME_LENGTH:
        reason = f"it is longer than {MAX_NAME_LENGTH} characters"
    elif not _NAME_RE.match(name):
        bad = sorted({c for c in name if not (c.isalnum() and c.isascii()) and c not in "_.-"})
        reason = (f"it contains {' '.join(repr(c) for c in bad) or 'a leading punctuation mark'}; "
                  "use letters, digits, '_', '-' and '.', starting with a letter, digit or '_'")
    elif name.split(".")[0].lower() in _WINDOWS_RESERVED:
        reason = "it is a reserved device name on Windows"
    elif name.endswith("."):
        reason = "it ends with '.', which Windows drops from file names"
    if reason:
        raise InvalidNameError(f"The {what} name {name!r} was refused: {reason}.")
    return name


def _check_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportWriteError(f"Cannot create the folder {folder}: {e.strerror or e}. "
                               "Choose a folder you can write to, or fix its permissions.") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportWriteError(f"The folder {folder} is not writable. Fix its permissions or choose another folder.")


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it to ``path`` without overwriting.

    Raises TargetExistsError before any work if ``path`` exists, and removes the temporary
    file on any failure, so no partial file is ever left behind.
    """
    target = Path(path)
    if target.exists():
        raise TargetExistsError(f"{target} already exists and will not be overwritten. "
                                "Choose another name, or move the existing file away first.")
    _check_folder(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            # os.link fails if the target exists, unlike os.replace, so a file that appeared
            # during a long write is never clobbered.
            os.link(tmp, target)
        except FileExistsError as e:
            raise TargetExistsError(f"{target} appeared while it was being written and was left as it is. "
                                    "Choose another name.") from e
        except OSError:
            # Filesystems without hard links (some network/FAT drives): best effort.
            if target.exists():
                raise TargetExistsError(f"{target} already exists and will not be overwritten.")
            os.replace(tmp, target)
    except OSError as e:
        if isinstance(e, (TargetExistsError, ExportWriteError)):
            raise
        raise ExportWriteError(f"Writing {target} failed: {e.strerror or e}. Nothing was written.") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically (see ``atomic_target``)."""
    with atomic_target(path) as tmp:
        write(tmp)
    return Path(path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted key order, so the same tensors and metadata
    always give the same bytes (and sha256). safetensors writes ``__metadata__`` in its Rust HashMap's random
    order (safetensors issue 584): with two or more keys, two saves of one model differ byte-wise. The header is
    rewritten in place, so give a temporary path (``write_atomic``) where a reader could see ``path``."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # the same members in another order, in the writer's compact JSON: as long as the header it wrote; where
        # not (a writer that formats otherwise), the file stays as written, valid but not byte-reproducible
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) != len(raw.rstrip(b" ")):
            return
        f.seek(8)
        f.write(text.ljust(n, b" "))


def embedding_tensor(vectors: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Stack one or more token vectors into the ``[n, dim]`` float32 layout ``load_embed`` reads."""
    if isinstance(vectors, (list, tuple)):
        vectors = torch.stack([torch.as_tensor(v).reshape(-1) for v in vectors])
    t = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] < 1:
        raise ValueError(f"An embedding must be [n, dim] (or [dim]); got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError("The embedding holds NaN or infinite values; it was not written.")
    return t.contiguous()


def save_embedding(folder: str | os.PathLike, name: str, vectors: torch.Tensor | list[torch.Tensor],
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``<folder>/<name>.safetensors`` = ``{"emb_params": [n, dim]}``; returns the path.

    ComfyUI reads it as ``embedding:<name>`` (n consecutive token vectors).
    """
    validate_export_name(name, "embedding")
    tensor = embedding_tensor(vectors)
    meta = {"format": "pt", "dynasyn.name": name, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return write_atomic(Path(folder) / f"{name}.safetensors",
                        lambda tmp: save_safetensors({"emb_params": tensor}, tmp, meta))


def save_embeddings(folder: str | os.PathLike, named_vectors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write several embeddings; all names and targets are checked before the first write."""
    folder = Path(folder)
    for name in named_vectors:
        validate_export_name(name, "embedding")
        if (folder / f"{name}.safetensors").exists():
            raise TargetExistsError(f"{folder / (name + '.safetensors')} already exists and will not be overwritten. "
                                    "Choose another run name.")
    return [save_embedding(folder, n, v, metadata) for n, v in named_vectors.items()]


def unique_name(folder: str | os.PathLike, base: str, suffix: str = ".safetensors") -> str:
    """``base`` if ``<folder>/<base><suffix>`` is free, else ``base_001``, ``base_002``, ..."""
    validate_export_name(base)
    folder = Path(folder)
    if not (folder / f"{base}{suffix}").exists():
        return base
    for i in range(1, 10000):
        cand = f"{base}_{i:03d}"
        if not (folder / f"{cand}{suffix}").exists():
            return cand
    raise TargetExistsError(f"No free name left for {base!r} in {folder}.")
