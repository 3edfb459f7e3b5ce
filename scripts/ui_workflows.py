"""API-format workflows <-> the canvas (LiteGraph) format that ComfyUI's template browser loads: the converter
scripts/example_workflows.py writes every canvas file with (the canvas files live in example_workflows/, which
ComfyUI serves to its template browser; the API twins in workflows/, for /prompt and the batch client).

The canvas format stores widget values by position (the node's widget inputs in INPUT_TYPES order, plus the
'control after generate' value after a seed), so the conversion needs the nodes' /object_info.
"""
from __future__ import annotations

LINKABLE = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "CLIP_VISION", "CONTROL_NET"}


def node_inputs(info: dict) -> list[tuple[str, object]]:
    spec = info["input"]
    return [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind not in LINKABLE


def has_control(name: str, spec) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return bool(options.get("control_after_generate")) or (name in ("seed", "noise_seed") and spec[0] == "INT")


def node_size(info: dict, n_inputs: int, n_outputs: int) -> list[int]:
    """Room for the node's slots and widgets (LiteGraph keeps a saved size even when it is too small), and for
    the image an output node shows after a run."""
    height = 16 + 20 * max(n_inputs, n_outputs, 1)
    for name, spec in node_inputs(info):
        if is_widget(spec):
            multiline = len(spec) > 1 and spec[1].get("multiline")
            height += 110 if multiline else 24 * (2 if has_control(name, spec) else 1)
    if info.get("output_node"):
        return [400, height + 360]
    return [360, height]


def place(nodes: list[dict], links: list[list]) -> None:
    """Left to right in data-flow order: a node's column is one past its furthest input's, and a column's nodes
    stack top to bottom, so links run forward and nothing overlaps."""
    sources: dict[int, list[int]] = {}
    for _, src, _, dst, *_ in links:
        sources.setdefault(dst, []).append(src)
    column: dict[int, int] = {}

    def depth(nid: int, seen: frozenset = frozenset()) -> int:
        if nid not in column:
            column[nid] = 1 + max((depth(s, seen | {nid}) for s in sources.get(nid, []) if s not in seen), default=-1)
        return column[nid]

    bottoms: dict[int, int] = {}
    for node in nodes:
        col = depth(node["id"])
        y = bottoms.get(col, 80)
        node["pos"] = [60 + 400 * col, y]
        bottoms[col] = y + node["size"][1] + 80                # room for the title bar and the hints above it


def to_ui(api: dict, object_info: dict) -> dict:
    order = sorted(api, key=int)
    nodes, links, slot_links = [], [], {}
    for nid in order:                                           # links first: outputs need their ids
        for name, value in api[nid]["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                kind = object_info[api[src]["class_type"]]["output"][slot]
                links.append([len(links) + 1, int(src), slot, int(nid), name, kind])
                slot_links.setdefault((src, slot), []).append(len(links))
    for i, nid in enumerate(order):
        node = api[nid]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in node_inputs(info):
            value = node["inputs"].get(name)
            if is_widget(spec) and not isinstance(value, list):
                widgets.append(value)
                if has_control(name, spec):
                    widgets.append("fixed")
            elif name in node["inputs"]:
                link = next(l for l in links if l[3] == int(nid) and l[4] == name)
                inputs.append({"name": name, "type": spec[0], "link": link[0]})
        outputs = [{"name": out_name, "type": kind, "links": slot_links.get((nid, s), []), "slot_index": s}
                   for s, (kind, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [0, 0],
                      "size": node_size(info, len(inputs), len(outputs)), "flags": {}, "order": i, "mode": 0,
                      "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    place(nodes, links)
    for link in links:                                          # LiteGraph links name the target slot index
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(k for k, inp in enumerate(target["inputs"]) if inp["name"] == link[4])
    return {"last_node_id": max(int(n) for n in order), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def to_api(ui: dict, object_info: dict) -> dict:
    """Back to API format (used by the tests to prove the conversion loses nothing)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        values = iter(node["widgets_values"])
        linked = {inp["name"]: inp["link"] for inp in node["inputs"] if inp.get("link") is not None}
        inputs = {}
        for name, spec in node_inputs(info):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif is_widget(spec):
                inputs[name] = next(values)
                if has_control(name, spec):
                    next(values)
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return api
