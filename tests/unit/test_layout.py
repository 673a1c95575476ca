"""The library must import nothing from ComfyUI, and the pack's registration must stay literal."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "latent_preview", "node_helpers"}


def test_dynasyn_library_imports_nothing_from_comfyui():
    offenders = []
    for path in (ROOT / "dynasyn").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert offenders == []


def test_node_class_mappings_is_a_literal_manager_can_read():
    src = (ROOT / "__init__.py").read_text(encoding="utf-8")
    body = re.search(r"NODE_CLASS_MAPPINGS\s*=\s*\{([^}]*)\}", src).group(1)
    keys = re.findall(r'"([^"]+)"\s*:', body)
    display = re.search(r"NODE_DISPLAY_NAME_MAPPINGS\s*=\s*\{([^}]*)\}", src).group(1)
    assert keys and keys == re.findall(r'"([^"]+)"\s*:', display)
    assert all(k.startswith("DynASyn") for k in keys)


def test_requirements_never_pin_torch():
    for name in ("requirements.txt", "pyproject.toml"):
        text = (ROOT / name).read_text()
        assert not re.search(r"^\s*\"?torch\b", text, re.M), name


def _git(*args):
    import subprocess

    try:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        import pytest

        pytest.skip("not a git checkout: the registry archive is built from git-tracked files")


def test_registry_archive_ships_the_pack_and_leaves_out_the_developer_files():
    """`comfy node publish` archives the git-tracked files minus .comfyignore (gitignore syntax, as git applies it)."""
    tracked = {f for f in _git("ls-files", "-z") if f}
    ignored = {f for f in _git("ls-files", "-z", "-ci", "--exclude-from=.comfyignore") if f}
    shipped = tracked - ignored
    for f in tracked:
        top = f.split("/")[0]
        if top in ("nodes", "dynasyn", "web", "example_workflows") or "/" not in f and f.endswith((".py", ".toml", ".txt", ".md")):
            assert f in shipped or f in ("requirements-dev.txt",), f
        if top in ("tests", "bench", ".ci", "demo", "docs"):
            assert f not in shipped, f
    assert {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "web/dynasyn.js",
            "dynasyn/shapes/weights/shapes_world.safetensors", "example_workflows/dynasyn_full.json"} <= shipped
    assert {f for f in shipped if f.startswith("scripts/")} == {"scripts/train_shapes_world.py"}
    # nothing shipped imports what is left out
    left_out = {f.split("/")[0] for f in ignored} | {"scripts"}
    for f in shipped:
        if not f.endswith(".py"):
            continue
        for node in ast.walk(ast.parse((ROOT / f).read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.split(".")[0] in left_out for m in mods if m), f"{f} imports {mods}"


def test_requires_comfyui_is_the_version_the_tests_run():
    import tomllib

    want = re.search(r'__version__ = "([^"]+)"', (ROOT / ".cache" / "ComfyUI" / "comfyui_version.py").read_text()).group(1)
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert f"ComfyUI {want}" in setup
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"] == f">={want}"
