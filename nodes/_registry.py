"""Imports node modules one by one so that a missing optional dependency disables only its nodes."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("DynASyn")

# Python module -> the pip package that provides it (for the install hint).
PIP_NAMES = {"segment_anything": "segment-anything", "PIL": "Pillow", "bitsandbytes": "bitsandbytes",
             "diffusers": "diffusers", "transformers": "transformers", "openai": "openai",
             "accelerate": "accelerate", "safetensors": "safetensors"}


def load_node_classes(package: str, modules: dict[str, tuple[str, ...]]) -> dict[str, type]:
    """Import ``package.<module>`` for each module and collect the named classes."""
    found: dict[str, type] = {}
    for module, class_names in modules.items():
        try:
            mod = importlib.import_module(f"{package}.{module}")
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if not top or top.startswith(package.split(".")[0]):
                raise  # a bug in the pack itself, not a missing dependency
            log.warning("[DynASyn] nodes %s disabled: the Python package '%s' is missing. Install it into ComfyUI's "
                        "Python with: pip install %s  (or: pip install -r requirements.txt in the pack folder).",
                        ", ".join(class_names), top, PIP_NAMES.get(top, top))
            continue
        for name in class_names:
            found[name] = getattr(mod, name)
    return found
