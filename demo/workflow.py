"""UI-format workflows (what the page saves and the template browser loads) -> API prompts.

The same rules as the frontend's ``graphToPrompt``, from the server's ``/object_info``: widgets
come in the node's input order (required, then optional); an INT marked ``control_after_generate``, or
named ``seed`` / ``noise_seed`` and not marked ``control_after_generate: False``, carries one extra "control" value right after it (an
image-upload button's value comes last). Notes and other frontend-only nodes are dropped; muted nodes are left out.
The browser tier checks this against the page's own conversion.
"""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _extra_values(name: str, spec: list) -> int:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "INT":  # as the frontend: an explicit control_after_generate wins over the name
        return int(bool(opts.get("control_after_generate", name in ("seed", "noise_seed"))))
    if (isinstance(kind, list) or kind == "COMBO") and opts.get("control_after_generate"):
        return 1
    return 0  # an image-upload button's value comes after every widget: nothing to skip


def widget_names(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of each widget input in the order the frontend lays them out."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        for name in order.get(group, []):
            if _is_widget(specs[name]):
                out.append((name, specs[name]))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {l[0]: l for l in workflow.get("links", [])}  # id -> [id, from_node, from_slot, to_node, to_slot, type]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY})
    if missing:
        raise WorkflowError(f"Missing node types: {', '.join(missing)}. Install the packs that provide them.")
    prompt: dict[str, Any] = {}
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise WorkflowError(f"Node {node['id']} ({node['type']}) is bypassed; un-bypass or remove it.")
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        k = 0
        for name, spec in widget_names(info):
            if k < len(values):
                inputs[name] = values[k]
            k += 1 + _extra_values(name, spec)
        for name, link_id in linked.items():
            if link_id is None:
                continue
            link = links.get(link_id)
            if link is None:
                raise WorkflowError(f"Node {node['id']} input {name!r} points at a missing link {link_id}.")
            source = nodes.get(link[1])
            if source is None or source["type"] in FRONTEND_ONLY:
                raise WorkflowError(f"Node {node['id']} input {name!r} comes from a frontend-only node; connect it directly.")
            if source.get("mode", 0) == MUTED:
                continue
            inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name", node["type"])}}
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]
