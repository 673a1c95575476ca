"""Finished runs: what names a training run (a hash of its inputs), what it keeps, and how it is found again.

A run is content-addressed: ``run_key`` hashes everything that decides the trained weights (the reference
picture, the subject masks, the class nouns, the base model's fingerprint, the settings, the augmented pairs
L_AUG trains on). Queueing the same inputs again finds the finished run and loads it instead of training;
``run_name`` is only a human prefix.

A finished run is one folder ``<root>/<run_name>/<key16>/`` (``root`` = ``user/__dynasyn/runs`` in ComfyUI,
a folder no HTTP route serves or uploads into), written to a temporary folder and renamed into place:

* ``run.json``: what the run is (key, names, class nouns, placeholder tokens, embedding names, the settings
  used, the base model's fingerprint, step count, exports), small enough to list many runs;
* ``history.json``: the loss of every step;
* ``unet.safetensors`` / ``text_encoder.safetensors``: only the trained tensors that differ from the base
  model, in the base model's dtype (for SD 1.5 in fp16 a full fine-tune is ~1.7 GB + ~0.25 GB; a
  textual-inversion run stores no weights at all), keyed as diffusers / transformers name them;
* ``embeddings.safetensors``: each placeholder token's vector (fp32, a few KB);
* ``inputs.safetensors``: the picture, masks and augmented pairs, so the run can be continued;
* ``samples.safetensors``: the pictures ``sample_every`` rendered (uint8), when any.

Only safetensors and JSON: nothing is unpickled. No optimizer state is kept (it would triple the size):
continuing starts a fresh optimizer from the stored weights.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .errors import DynASynError
from .export import MAX_NAME_LENGTH, validate_export_name
from .state import _SAMPLES_PER_TENSOR, _tensor_hash

RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
MARKER = ".dynasyn_run"
FORMAT = 1
KEY_CHARS = 16  # of the 64 hex digits: the folder name (the full key is in run.json)
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
_TMP_RE = re.compile(r"^\.[0-9a-f]{16}\.")
MAX_LISTED = 1000
# settings that change how training runs (memory, saving), not what it trains: not part of the key
NON_RESULT_SETTINGS = frozenset({"gradient_checkpointing", "save_every"})
WEIGHT_FILES = ("unet.safetensors", "text_encoder.safetensors")
FREE_SPACE_MARGIN = 256 * 2 ** 20


# ------------------------------------------------------------------ hashing
def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        _tensor_hash(h, torch.as_tensor(t))
    return h.hexdigest()


def sampled_digest(items: Iterable[tuple[str, torch.Tensor]], extra: Iterable = ()) -> str:
    """Name, shape, dtype and an evenly strided sample of every tensor (as ``state._model_hash``), plus any
    ``extra`` values: a model's identity in a fraction of a second, without reading every weight."""
    h = hashlib.sha256()
    for name, t in items:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        h.update(name.encode())
        _tensor_hash(h, flat[::stride][:_SAMPLES_PER_TENSOR])
        h.update(f"|{flat.numel()}|{t.dtype}|{tuple(t.shape)}".encode())
    for value in extra:
        h.update(repr(value).encode())
    return h.hexdigest()


def dataset_digest(pairs: Sequence) -> str | None:
    if not pairs:
        return None
    h = hashlib.sha256()
    for p in pairs:
        _tensor_hash(h, p.image)
        _tensor_hash(h, p.masks)
        h.update(json.dumps([p.class_prompt, list(p.subjects), p.meta], sort_keys=True, default=str).encode())
    return h.hexdigest()


def result_settings(config) -> dict:
    return {k: v for k, v in sorted(asdict(config).items()) if k not in NON_RESULT_SETTINGS}


def run_key(*, picture: torch.Tensor, masks: Sequence[torch.Tensor], class_nouns: Sequence[str], base_model: Mapping,
            config, memory_preset: str = "custom", dataset: Sequence = ()) -> str:
    """The run's identity: 64 hex digits of everything that decides its trained weights. The augmented pairs
    count only when the mode trains on them (L_AUG)."""
    uses_pairs = "aug" in config.losses
    doc = {"format": FORMAT, "picture": _digest(picture), "masks": _digest(*masks),
           "class_nouns": [n.strip() for n in class_nouns], "base_model": dict(base_model),
           "config": result_settings(config), "memory_preset": memory_preset,
           "dataset": dataset_digest(dataset) if uses_pairs else None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def continued_key(parent_key: str, steps: int) -> str:
    """A run continued by ``steps`` from ``parent_key``: continuing the same run by the same steps twice loads."""
    return hashlib.sha256(f"dynasyn.continue|{parent_key}|{int(steps)}".encode()).hexdigest()


# ------------------------------------------------------------------ names
def _noun_part(noun: str, i: int) -> str:
    part = re.sub(r"[^A-Za-z0-9_.\-]+", "_", noun.strip())
    part = re.sub(r"_+", "_", part).strip("_.-")
    return part or f"subject{i + 1}"


def embedding_names(prefix: str, class_nouns: Sequence[str]) -> list[str]:
    """``<prefix>_<noun>`` per subject, the noun made a valid name ('teddy bear' -> 'teddy_bear'); a noun
    that repeats gets ``_2``, ``_3``... ('panda, panda' -> prefix_panda, prefix_panda_2)."""
    validate_export_name(prefix, "run")
    out, taken = [], set()
    for i, noun in enumerate(class_nouns):
        part = _noun_part(noun, i)
        for k in range(1, len(class_nouns) + 2):
            suffix = f"_{k}" if k > 1 else ""
            room = MAX_NAME_LENGTH - len(prefix) - 1 - len(suffix)
            name = (f"{prefix}_{part[:room]}".rstrip("_.-") if room > 0 else prefix[:MAX_NAME_LENGTH - len(suffix)]) + suffix
            if name.lower() not in taken:  # case-insensitive file systems
                break
        taken.add(name.lower())
        out.append(validate_export_name(name, "embedding"))
    return out


def free_prefix(folder: str | os.PathLike, base: str, class_nouns: Sequence[str]) -> str:
    """``base`` or ``base_001``... such that none of its embedding files exists in ``folder``."""
    folder = Path(folder)
    for k in range(10000):
        cand = base if k == 0 else f"{base[:MAX_NAME_LENGTH - 20].rstrip('_.-')}_{k:03d}"
        if not any((folder / f"{n}.safetensors").exists() for n in embedding_names(cand, class_nouns)):
            return cand
    raise DynASynError(f"No free embedding name left for {base!r} in {folder}.")


def scene_prompt(text: str, words: Sequence[str]) -> str:
    """A scene written with ``[1]``, ``[2]``... rendered with the subjects' ``words``; empty: 'a photo of' all."""
    from .prompts import MARKER, PromptTemplate

    if not isinstance(text, str):
        raise DynASynError("The scene must be text such as '[1] hugging [2] on a beach'.")
    if not text.strip():
        return "a photo of " + " and ".join(words)
    n = len(words)
    used = sorted({int(m) for m in MARKER.findall(text)})
    if not used or used[0] < 1 or used[-1] > n:
        raise DynASynError(f"The scene must name the subjects as [1]…[{n}] (e.g. '[1] hugging [2] on a beach'); "
                           f"got {text!r}.")
    return PromptTemplate(" ".join(text.split())).render(list(words))


# ------------------------------------------------------------------ disk
def tensor_bytes(*state_dicts: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for sd in state_dicts for t in sd.values())


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def check_free_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Refuse, before writing, ``need`` bytes that the disk holding ``folder`` cannot take (with a margin)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + FREE_SPACE_MARGIN:
        raise DynASynError(f"Not enough free disk space for {what}: it needs about {_gib(need)} and {probe} has "
                           f"{_gib(free)} free. Free some space (finished runs are folders under "
                           "ComfyUI/user/__dynasyn/runs and can be deleted) and queue again; nothing was lost.")


# ------------------------------------------------------------------ the store
@dataclass(frozen=True)
class RunInfo:
    """What the ``DYNASYN_RUN`` socket carries: enough to write prompts with the run's subjects."""

    label: str                    # "<run_name>/<key16>", as Load Run lists it
    words: tuple[str, ...]        # ("embedding:dynasyn_panda", ...)
    class_nouns: tuple[str, ...]
    steps: int


@dataclass
class RunRecord:
    folder: Path
    meta: dict

    @property
    def label(self) -> str:
        return f"{self.folder.parent.name}/{self.folder.name}"

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def words(self) -> list[str]:
        return [f"embedding:{n}" for n in self.meta["embeddings"]]

    @property
    def info(self) -> RunInfo:
        return RunInfo(self.label, tuple(self.words), tuple(self.meta["class_nouns"]), int(self.meta["steps"]))

    def tensors(self, file: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.folder / file
        if not path.is_file():
            return {}
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001  (a truncated or foreign file)
            raise DynASynError(f"The run {self.label} is damaged ({file}: {type(e).__name__}); delete {self.folder} "
                               "and train again.") from None

    def history(self) -> list[dict]:
        try:
            data = json.loads((self.folder / HISTORY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def update(self, **changes) -> None:
        """Rewrite run.json with ``changes`` (atomically: a reader sees the old or the new file)."""
        self.meta.update(changes)
        _write_json(self.folder / RUN_FILE, self.meta)


_REQUIRED = {"format": int, "key": str, "name": str, "class_nouns": list, "tokens": list, "embeddings": list,
             "steps": int, "config": dict, "base_model": dict}


def _write_json(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DynASynError(f"The run in {folder} is unreadable ({type(e).__name__}); delete the folder.") from None
    bad = [k for k, t in _REQUIRED.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    if bad or meta["format"] != FORMAT or not str(meta["key"]).startswith(folder.name):
        raise DynASynError(f"The run in {folder} is not a DynASyn run of this version ({', '.join(bad) or 'format'}); "
                           "delete the folder.")
    if len(meta["embeddings"]) != len(meta["class_nouns"]) or len(meta["tokens"]) != len(meta["class_nouns"]):
        raise DynASynError(f"The run in {folder} lists {len(meta['class_nouns'])} subjects but "
                           f"{len(meta['embeddings'])} embeddings; delete the folder.")
    for name in meta["embeddings"]:
        validate_export_name(name, "embedding")
    return meta


def _entries(root: Path) -> list[tuple[float, Path]]:
    """Finished-run folders ``<root>/<name>/<key16>`` (no symlinks, valid names only), newest first, at most
    ``MAX_LISTED``: a bounded two-level scan, never a recursive walk."""
    found = []
    if not root.is_dir():
        return found
    with os.scandir(root) as names:
        for n in names:
            if n.name.startswith(".") or not n.is_dir(follow_symlinks=False):
                continue
            try:
                validate_export_name(n.name, "run")
            except DynASynError:
                continue
            with os.scandir(n.path) as keys:
                for k in keys:
                    if not _KEY_RE.match(k.name) or not k.is_dir(follow_symlinks=False):
                        continue
                    run_file = Path(k.path) / RUN_FILE
                    if run_file.is_file() and not run_file.is_symlink() and (Path(k.path) / MARKER).is_file():
                        found.append((run_file.stat().st_mtime, Path(k.path)))
    found.sort(key=lambda e: (-e[0], str(e[1])))
    return found[:MAX_LISTED]


def list_runs(root: str | os.PathLike) -> list[str]:
    """Labels ``<run_name>/<key16>`` of the finished runs under ``root``, newest first."""
    return [f"{p.parent.name}/{p.name}" for _, p in _entries(Path(root))]


def resolve_run(root: str | os.PathLike, label: str) -> RunRecord:
    """The finished run a combo value names. The value is untrusted: it must be one of ``list_runs`` exactly
    (so no '..', absolute path or symlink reaches the filesystem), and its metadata must be well-formed."""
    root = Path(root)
    if not isinstance(label, str) or label not in list_runs(root):
        shown = label if isinstance(label, str) and len(label) <= 120 else type(label).__name__
        raise DynASynError(f"{shown!r} is not a finished run. Choose one from the list (refresh the page after "
                           "training), or train it first.")
    name, key = label.split("/")
    folder = root / validate_export_name(name, "run") / key
    return RunRecord(folder, _read_meta(folder))


def find_run(root: str | os.PathLike, key: str, prefer: str | None = None) -> RunRecord | None:
    """The finished run whose full key is ``key`` (``prefer``: the run name looked at first)."""
    entries = [p for _, p in _entries(Path(root)) if p.name == key[:KEY_CHARS]]
    entries.sort(key=lambda p: p.parent.name != prefer)
    for folder in entries:
        try:
            meta = _read_meta(folder)
        except DynASynError:
            continue
        if meta["key"] == key:
            return RunRecord(folder, meta)
    return None


def save_run(root: str | os.PathLike, name: str, key: str, meta: Mapping, history: Sequence[Mapping],
             files: Mapping[str, Mapping[str, torch.Tensor]]) -> RunRecord:
    """Write a finished run atomically (a temporary folder renamed into place; a run of the same key is
    replaced only once the new one is complete). Refused up front when the disk cannot hold it."""
    from safetensors.torch import save_file

    validate_export_name(name, "run")
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise DynASynError(f"Not a run key: {key!r}.")
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.iterdir():  # a write that died half-way (only our own temporary folders)
        if _TMP_RE.match(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    check_free_space(parent, tensor_bytes(*files.values()), f"the finished run {name}")
    folder = parent / key[:KEY_CHARS]
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:KEY_CHARS]}.", dir=parent))
    try:
        for file, tensors in files.items():
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / file))
        full = {**meta, "format": FORMAT, "key": key, "name": name,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "files": {p.name: p.stat().st_size for p in tmp.iterdir()}}
        (tmp / HISTORY_FILE).write_text(json.dumps(list(history)), encoding="utf-8")
        (tmp / RUN_FILE).write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")
        (tmp / MARKER).write_text("A finished DynASyn run; safe to delete.\n", encoding="utf-8")
        if folder.exists() or folder.is_symlink():
            if not (folder / MARKER).is_file() or folder.is_symlink():
                raise DynASynError(f"{folder} exists and is not a DynASyn run; it is left alone.")
            old = parent / f".{key[:KEY_CHARS]}.old"
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RunRecord(folder, _read_meta(folder))


# ------------------------------------------------------------------ continuing
def load_trained(comps, unet_sd: Mapping[str, torch.Tensor], te_sd: Mapping[str, torch.Tensor],
                 placeholders: Mapping[str, torch.Tensor]) -> None:
    """Put a run's trained tensors (the ones that differ from the base) and its placeholder vectors into
    ``comps`` (base weights, placeholder tokens already added by the trainer), in the modules' dtype."""
    with torch.no_grad():
        params = dict(comps.unet.state_dict(keep_vars=True))
        for k, v in unet_sd.items():
            if k not in params or params[k].shape != v.shape:
                raise DynASynError(f"The run's UNet tensor {k} does not fit this model; was it trained from another base?")
            params[k].copy_(v.to(params[k].dtype))
        params = dict(comps.text_encoder.state_dict(keep_vars=True))
        for k, v in te_sd.items():
            p = params.get(k)
            if p is None or p.shape[1:] != v.shape[1:] or p.shape[0] < v.shape[0]:
                raise DynASynError(f"The run's text-encoder tensor {k} does not fit this model.")
            p[: v.shape[0]].copy_(v.to(p.dtype))  # the token table: the base rows; placeholders below
        emb = comps.text_encoder.get_input_embeddings().weight
        for token, vec in placeholders.items():
            idx = comps.tokenizer.convert_tokens_to_ids(token)
            if not isinstance(idx, int) or idx >= emb.shape[0] or idx < 0:
                raise DynASynError(f"The run's placeholder {token} is not in the tokenizer.")
            emb[idx].copy_(vec.to(emb.dtype))


def pack_inputs(picture: torch.Tensor, masks: Sequence[torch.Tensor], dataset: Sequence = ()) -> tuple[dict, list]:
    """(tensors, JSON list) of what training read, so the run can be continued without its graph."""
    tensors = {"picture": picture.float(), "masks": torch.stack([m.float() for m in masks])}
    pairs = []
    for i, p in enumerate(dataset):
        tensors[f"pair{i}.image"] = p.image.float()
        tensors[f"pair{i}.masks"] = p.masks.float()
        pairs.append({"class_prompt": p.class_prompt, "subjects": list(p.subjects), "meta": p.meta})
    return tensors, pairs


def unpack_inputs(record: RunRecord):
    """(picture, masks, augmented pairs) a run was trained on."""
    from .dataset import AugmentedPair

    t = record.tensors("inputs.safetensors")
    pairs_meta = record.meta.get("dataset") or []
    if "picture" not in t or "masks" not in t or any(f"pair{i}.image" not in t for i in range(len(pairs_meta))):
        raise DynASynError(f"The run {record.label} does not keep its training inputs, so it cannot be continued.")
    pairs = [AugmentedPair(t[f"pair{i}.image"], str(p["class_prompt"]), [int(s) for s in p["subjects"]],
                           t[f"pair{i}.masks"], dict(p.get("meta") or {})) for i, p in enumerate(pairs_meta)]
    return t["picture"], list(t["masks"]), pairs


def continue_from(trainer, record: RunRecord) -> None:
    """Set a trainer built on the run's base model and inputs (so its frozen copy and fingerprint are the
    base's) to where the finished run ended: its trained weights and placeholder vectors, its step count and
    loss history. The next ``train()`` then runs only the added steps, with a fresh optimizer and random
    streams seeded from (seed, step), so continuing is reproducible."""
    from .train import StepLog

    tokens = [s.token for s in trainer.subjects]
    if tokens != list(record.meta["tokens"]):
        raise DynASynError(f"The run {record.label} has the subjects {record.meta['tokens']}, not {tokens}.")
    placeholders = record.tensors("embeddings.safetensors")
    if set(placeholders) != set(tokens):
        raise DynASynError(f"The run {record.label} does not keep the vectors of {', '.join(tokens)}; it cannot be continued.")
    load_trained(trainer.c, record.tensors("unet.safetensors"), record.tensors("text_encoder.safetensors"), placeholders)
    step = int(record.meta["steps"])
    trainer.step = step
    trainer.history = [StepLog(**{k: h[k] for k in ("step", "phase", "loss", "terms", "lr", "subjects")})
                       for h in record.history()]
    seed = f"dynasyn.continue|{trainer.cfg.seed}|{step}"
    trainer.rng.seed(seed)
    trainer.gen.manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:15], 16))
