"""In-process access to the real ComfyUI 0.3.75 tree that scripts/setup_env.sh unpacks.

Used by the format tier (ComfyUI's own loaders and savers, no server). The pack itself is loaded
as the package ``dynasyn_pack`` so that its ``nodes`` package does not shadow ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = Path(os.environ.get("DYNASYN_COMFYUI_DIR", ROOT / ".cache" / "ComfyUI"))
_ready = False


def setup_comfy():
    """Import ComfyUI in-process on the CPU (idempotent); returns the ComfyUI dir."""
    global _ready
    if _ready:
        return COMFY_DIR
    if not (COMFY_DIR / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}; run scripts/setup_env.sh first")
    # ComfyUI's `nodes.py` must win over the pack's `nodes/` package that the repo root would expose.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    sys.path.insert(0, str(COMFY_DIR))
    sys.modules.pop("nodes", None)
    argv = sys.argv
    sys.argv = ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu now)
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = argv
    _ready = True
    return COMFY_DIR


def load_pack():
    """Import the pack (repo root) as package ``dynasyn_pack``, as ComfyUI would import it."""
    setup_comfy()
    if "dynasyn_pack" in sys.modules:
        return sys.modules["dynasyn_pack"]
    spec = importlib.util.spec_from_file_location("dynasyn_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dynasyn_pack"] = mod
    spec.loader.exec_module(mod)
    return mod
