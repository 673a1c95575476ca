"""DynASyn Load Diffusers Model: a diffusers folder in ``models/diffusers`` -> MODEL, CLIP, VAE."""

from __future__ import annotations

import os

import diffusers  # noqa: F401  (optional dependency: without it only this module's nodes are disabled)
import folder_paths

from ..dynasyn.errors import DynASynError
from ..dynasyn.export import save_embedding, validate_export_name
from . import bridge
from .common import user_error


MAX_SCAN_DEPTH = 3          # models/diffusers/<a>/<b>/<c>/model_index.json at the deepest
MAX_SCAN_DIRS = 2000        # folders looked at per base folder, whatever is below
_scan_cache: dict = {}


def _scan(base: str) -> tuple[list[str], dict[str, int]]:
    """Diffusers folders under ``base`` (relative names) and the mtimes of the folders looked at.

    Bounded: at most ``MAX_SCAN_DEPTH`` levels and ``MAX_SCAN_DIRS`` folders; a symlinked folder is
    followed (models are often linked in) but never into a folder already seen (no cycles)."""
    found, mtimes, seen = [], {}, set()
    stack = [(base, 0)]
    while stack and len(mtimes) < MAX_SCAN_DIRS:
        path, depth = stack.pop()
        try:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            mtimes[path] = os.stat(path).st_mtime_ns
            if path != base and os.path.isfile(os.path.join(path, "model_index.json")):
                found.append(os.path.relpath(path, base))
                continue
            if depth >= MAX_SCAN_DEPTH:
                continue
            with os.scandir(path) as it:
                subs = [e.path for e in it if not e.name.startswith(".") and e.is_dir()]
        except OSError:
            continue
        stack.extend((sub, depth + 1) for sub in sorted(subs, reverse=True))
    return sorted(found), mtimes


def _diffusers_folders() -> list[str]:
    """The diffusers folders of every models/diffusers path; rescanned only when a folder looked at changed
    (this runs on every /object_info)."""
    found = []
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        cached = _scan_cache.get(base)
        if cached is not None:
            try:
                fresh = all(os.stat(p).st_mtime_ns == m for p, m in cached[1].items())
            except OSError:
                fresh = False
            if not fresh:
                cached = None
        if cached is None:
            cached = _scan_cache[base] = _scan(base)
        found += cached[0]
    return sorted(set(found))


def _resolve(name: str) -> str:
    """The folder of a listed diffusers model; anything else (a path, '..', an unlisted name) is refused
    before it reaches the filesystem."""
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
    if not parts or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts) or name not in _diffusers_folders():
        raise DynASynError(f"{str(name)[:80]!r} is not a diffusers folder of models/diffusers: pick one from the list "
                           "(put the folder, with model_index.json, into models/diffusers and refresh).")
    for base in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(base, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    raise DynASynError(f"No diffusers folder named {name!r} in models/diffusers. "
                       "Put the folder (with model_index.json) into models/diffusers and refresh.")


class DynASynDiffusersLoader:
    DESCRIPTION = ("Loads a Stable Diffusion 1.x / 2.x model saved in diffusers format (a folder with model_index.json "
                   "in models/diffusers), e.g. the output of `python -m dynasyn train`. Unlike the core loader it reads "
                   "text encoders saved by any transformers version, keeps v-prediction, and writes the folder's "
                   "placeholder tokens (<asset0>, ...) as embeddings so prompts can use them.")
    CATEGORY = "DynASyn/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "placeholders")
    OUTPUT_TOOLTIPS = ("The diffusion model.", "The text encoder.", "The VAE.",
                       "Prompt words for the folder's placeholder tokens, e.g. 'embedding:mymodel_asset0'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_path": (_diffusers_folders() or ["(no folder in models/diffusers)"],
                           {"tooltip": "A diffusers Stable Diffusion 1.x / 2.x folder under models/diffusers."}),
            "export_placeholders": ("BOOLEAN", {"default": True, "tooltip": (
                "Write each placeholder token of the folder's tokenizer to models/embeddings/<folder>_<token>.safetensors "
                "(only if that file does not exist yet), so 'embedding:<name>' works in CLIPTextEncode.")}),
        }}

    def load(self, model_path, export_placeholders=True):
        try:
            from ..dynasyn.models import load_components

            comps = load_components(_resolve(model_path))
            emb_dirs = folder_paths.get_folder_paths("embeddings")
            model, clip, vae = bridge.components_to_new_native(comps, embedding_directory=emb_dirs)
            words = []
            stem = os.path.basename(os.path.normpath(model_path)).replace(" ", "_")
            for token, vec in bridge.placeholder_vectors(comps).items():
                name = f"{stem}_{''.join(c for c in token if c.isalnum() or c in '_-')}"
                validate_export_name(name, "embedding")
                if export_placeholders and not os.path.exists(os.path.join(emb_dirs[0], name + ".safetensors")):
                    save_embedding(emb_dirs[0], name, vec, {"dynasyn.token": token, "dynasyn.source": model_path})
                words.append(f"embedding:{name}")
        except Exception as e:  # noqa: BLE001 - shown to the user with what to do
            raise user_error(e) from e
        return (model, clip, vae, " ".join(words))
