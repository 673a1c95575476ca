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
