"""The pack in a real ComfyUI 0.3.75 server: every node registered, no import failure."""

import re
from pathlib import Path

import pytest

from demo.server import PACK_DIR_NAME
from tests.support.comfy_server import ComfyServer, fresh_base

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def declared_nodes():
    src = (ROOT / "__init__.py").read_text()
    body = re.search(r"NODE_CLASS_MAPPINGS\s*=\s*\{([^}]*)\}", src).group(1)
    return re.findall(r'"([^"]+)"\s*:', body)


def pack_import_failures(log: str, base: Path) -> list[str]:
    """Import-failure lines naming this pack's own module path exactly.

    ComfyUI's audio nodes fail here without torchaudio, and their path (under this clone's
    ``.cache/ComfyUI``) contains "DynASyn" when the clone is named ComfyUI-DynASyn, so a substring
    match on the name would blame the pack for them.
    """
    pack = re.escape(str(base / "custom_nodes" / PACK_DIR_NAME))
    pattern = re.compile(rf"(IMPORT FAILED\)?: {pack}$|Cannot import {pack} module for custom nodes)")
    return [line for line in log.splitlines() if pattern.search(line.rstrip())]


def test_import_failure_filter_names_only_the_pack(tmp_path):
    base = tmp_path / "base"
    pack = base / "custom_nodes" / PACK_DIR_NAME
    audio = f"/x/{PACK_DIR_NAME}/.cache/ComfyUI/comfy_extras/nodes_audio.py"
    log = "\n".join([f"Cannot import {audio} module for custom nodes: No module named 'torchaudio'",
                     f"IMPORT FAILED: {audio}",
                     f"   0.1 seconds (IMPORT FAILED): {pack}",
                     f"Cannot import {pack} module for custom nodes: boom"])
    assert pack_import_failures(log, base) == log.splitlines()[2:]


def test_every_node_appears_in_object_info(server):
    info = server.get("/object_info")
    nodes = declared_nodes()
    missing = [n for n in nodes if n not in info]
    assert not missing, server.log()[-3000:]
    for n in nodes:
        entry = info[n]
        assert entry["python_module"].startswith("custom_nodes.")
        assert entry["category"].startswith("DynASyn/")
        assert entry["description"]
        for section in ("required", "optional"):
            for name, spec in entry["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{n}.{name} has no tooltip"
    log = server.log()
    assert pack_import_failures(log, server.base) == [], log[-3000:]
    assert "[DynASyn] nodes" not in log  # nothing was disabled


def test_missing_optional_dependency_disables_only_its_nodes(tmp_path):
    # A stand-in 'diffusers' package that fails to import, first on the server's path.
    shim = tmp_path / "shim" / "diffusers"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'diffusers'\", name='diffusers')\n")
    with ComfyServer(fresh_base(tmp_path / "base"), env={"PYTHONPATH": str(shim.parent)}) as s:
        info = s.get("/object_info")
        log = s.log()
    needs_diffusers = {"DynASynDiffusersLoader", "DynASynTinyModel", "DynASynShapesWorldModel"}
    assert not needs_diffusers & set(info)
    others = [n for n in declared_nodes() if n not in needs_diffusers]
    assert others and all(n in info for n in others)
    for n in needs_diffusers:
        assert f"nodes {n} disabled: the Python package 'diffusers' is missing" in log
    assert "pip install diffusers" in log
    assert pack_import_failures(log, tmp_path / "base") == []
