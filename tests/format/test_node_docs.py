"""Node help pages: ComfyUI's frontend (1.32.9) reads a custom node's help from the pack's web folder at
``/extensions/<pack>/docs/<node class>/<locale>.md``, else ``/extensions/<pack>/docs/<node class>.md``. The pack
ships ``web/docs/<node class>.md`` for each main node; each page names every input and output of its node."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "web" / "docs"
MAIN_NODES = ("DynASynTrain", "DynASynAugment", "DynASynDrafts", "DynASynCompose", "DynASynMakePair",
              "DynASynDescribeSubjects", "DynASynAugmentPrompts", "DynASynLLMSettings", "DynASynSAMLoader",
              "DynASynSAMMasks", "DynASynLoadDataset", "DynASynSaveCheckpoint", "DynASynShapesWorldModel")


def test_every_main_node_has_a_help_page(pack):
    for name in MAIN_NODES:
        assert name in pack.NODE_CLASS_MAPPINGS, name
        assert (DOCS / f"{name}.md").is_file(), f"web/docs/{name}.md is missing"


def test_each_page_is_a_registered_nodes_and_names_all_its_inputs_and_outputs(pack):
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= len(MAIN_NODES)
    for page in pages:
        name = page.stem
        assert name in pack.NODE_CLASS_MAPPINGS, f"{page.name} is no node's page (the file name is the node class)"
        text = page.read_text(encoding="utf-8")
        assert text.startswith(f"# {pack.NODE_DISPLAY_NAME_MAPPINGS[name]}\n"), f"{page.name}: title is not the display name"
        cls = pack.NODE_CLASS_MAPPINGS[name]
        spec = cls.INPUT_TYPES()
        inputs = [*spec.get("required", {}), *spec.get("optional", {})]
        missing = [i for i in inputs if f"`{i}`" not in text]
        assert not missing, f"{page.name} does not name the inputs {missing}"
        outputs = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
        missing = [o for o in outputs if f"`{o}`" not in text]
        assert not missing, f"{page.name} does not name the outputs {missing}"


def test_the_pack_serves_its_web_folder_where_the_frontend_looks():
    """WEB_DIRECTORY is the folder holding docs/, so ComfyUI serves it at /extensions/<pack>/docs/."""
    src = (ROOT / "__init__.py").read_text()
    web = re.search(r'^WEB_DIRECTORY\s*=\s*"([^"]+)"', src, re.M).group(1)
    assert (ROOT / web).resolve() == DOCS.parent


@pytest.mark.parametrize("pattern", [r"/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}/\$\{\w+\}\.md",
                                     r"/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}\.md"])
def test_the_installed_frontend_looks_up_help_pages_there(pattern):
    import comfyui_frontend_package

    assets = Path(comfyui_frontend_package.__file__).parent / "static" / "assets"
    bundles = [p for p in assets.glob("*.js") if "fetchCustomNodeHelp" in p.read_text(encoding="utf-8", errors="ignore")]
    assert bundles, "the frontend no longer has fetchCustomNodeHelp: check where it reads node help now"
    assert any(re.search(pattern, p.read_text(encoding="utf-8", errors="ignore")) for p in bundles)
