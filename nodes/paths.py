"""Where the pack keeps what it reads back: a folder ComfyUI neither serves nor accepts uploads into.

ComfyUI serves ``output/``, ``input/`` and ``temp/`` through ``/view`` and writes any uploaded file into
them (``/upload/image?type=output``), and ``user/<user>`` through ``/userdata``. Its System User
folders (``user/__<name>``) are reachable by no HTTP route (``folder_paths.get_public_user_directory``
returns None for them), so resumable training states and datasets live in ``user/__dynasyn``.
"""

from __future__ import annotations

import os

import folder_paths

from ..dynasyn.export import validate_export_name

PRIVATE_NAME = "dynasyn"


def private_root() -> str:
    """``<ComfyUI>/user/__dynasyn`` (created on demand by the writers)."""
    getter = getattr(folder_paths, "get_system_user_directory", None)
    if getter is not None:
        return getter(PRIVATE_NAME)
    return os.path.join(folder_paths.get_user_directory(), "__" + PRIVATE_NAME)  # ComfyUI before System Users


def datasets_dir() -> str:
    return os.path.join(private_root(), "datasets")


def runs_dir() -> str:
    return os.path.join(private_root(), "runs")


def state_dir(run_name: str) -> str:
    """The resumable state of ``run_name``: the name is validated before it becomes part of a path."""
    validate_export_name(run_name, "run")
    return os.path.join(runs_dir(), run_name, "state")


def continue_state_dir(run_name: str, key: str) -> str:
    """The resumable state of a 'Continue training' of ``run_name`` (one per continued run, never the state a
    Train of that name resumes from)."""
    validate_export_name(run_name, "run")
    if not (len(key) >= 16 and all(c in "0123456789abcdef" for c in key)):
        raise ValueError(f"not a run key: {key!r}")
    return os.path.join(runs_dir(), run_name, f"continue_{key[:16]}", "state")
