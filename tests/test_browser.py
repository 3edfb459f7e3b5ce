"""The canvas extension (js/zimage_turbo.js) in ComfyUI's real frontend, in headless Chromium, against a real
ComfyUI running the pack on tiny random weights: 0.30.0 with the frontend in the venv (the one it pins), and
0.3.75 with the older frontend it pins, which scripts/setup_runtime.sh unpacks to .runtime/frontend-0.3.75.

Every test saves a screenshot to output/browser/VERSION/ (git-ignored) so a person can see what the assertions saw.
Chromium comes from Debian (scripts/setup_browser.sh); without it these tests skip and say so.
"""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from zimage_dev import REPO, RUNTIME
from zimage_dev.browser import CHROMIUM, chromium
from zimage_dev.comfy_server import ComfyServer, write_tiny_models
from zimage_dev.runtime import comfyui_tree

SHOTS = REPO / "output" / "browser"
PACK = "comfyui_zimage_turbo"
PACK_NODES = {"ZImageTurboLoader": "Z-Image Loader", "ZImageTurboCheckpointLoader": "Z-Image Checkpoint Loader",
              "ZImageTurboSampler": "Z-Image Sampler", "ZImageTurboVAEDecode": "Z-Image VAE Decode",
              "ZImageTurboSize": "Z-Image Size", "ZImageTurboSaveImage": "Z-Image Save Image",
              "ZImageTurboCompile": "Z-Image Compile"}
APP = "window.comfyAPI.app.app"
WARN_RGB = (0x5A, 0x1E, 0x1E)          # the cfg hint's fill colour in js/zimage_turbo.js
INFO_RGB = (0x1E, 0x3A, 0x2A)          # the run-info tag's fill colour

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"no Chromium at {CHROMIUM}: run scripts/setup_browser.sh (Debian's chromium)")


# The venv's comfyui_frontend_package is the one 0.30.0 pins; other versions get theirs with --front-end-root.
FRONTENDS = {"0.3.75": RUNTIME / "frontend-0.3.75"}


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    version = request.param
    tree = comfyui_tree(version)
    extra = []
    if version in FRONTENDS:
        root = FRONTENDS[version]
        if not (root / "index.html").is_file():
            pytest.skip(f"no frontend for ComfyUI {version} at {root}: run scripts/setup_runtime.sh")
        extra = ["--front-end-root", str(root)]
    base = tmp_path_factory.mktemp(f"browser-{version}")
    write_tiny_models(base / "models")
    with ComfyServer(version, base, extra_args=extra) as srv:
        # A returning user: no first-run template browser over the canvas.
        status, _ = srv.post("/settings/Comfy.TutorialCompleted", True)
        assert status == 200
        # Which frontend the page must report: the one this tree's requirements.txt pins.
        srv.frontend = re.search(r"^comfyui-frontend-package==(\S+)", (tree / "requirements.txt").read_text(),
                                 re.M).group(1)
        yield srv


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(server, browser, request):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Z-Image" in m.text else None)
    page.goto(server.url)
    page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager "
                           "&& window.LiteGraph", timeout=120_000)
    page.wait_for_function(f"() => ({APP}.extensions || []).some(e => e.name === 'ZImageTurbo.Canvas')",
                           timeout=30_000)
    # Node classes are registered from /object_info after start-up, and then the app loads its default graph;
    # a workflow loaded before that would be replaced by it.
    page.wait_for_function(f"() => LiteGraph.registered_node_types.ZImageTurboSaveImage && {APP}.graph.nodes.length",
                           timeout=60_000)
    # the tests mean something for this ComfyUI only with the frontend it was released with
    assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == server.frontend
    page.errors = errors
    yield page
    shots = SHOTS / server.version                                  # one folder per ComfyUI version
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{request.node.originalname}.png"))    # what the test ended on
    context.close()
    ours = [e for e in errors if "zimage" in e.lower() or "z-image" in e.lower()]
    assert not ours, f"errors from the extension: {ours}"


def load_bundled_workflow(page) -> None:
    """Load example_workflows/ecommerce_turbo.json as the template browser does: fetched from ComfyUI's template route."""
    page.evaluate(f"""async () => {{
        const r = await fetch('/api/workflow_templates/{PACK}/ecommerce_turbo.json');
        await {APP}.loadGraphData(await r.json());
    }}""")
    page.wait_for_function(f"() => {APP}.graph.nodes.length === 7")
    frame(page)


def frame(page, scale: float = 0.68) -> None:
    """The whole workflow in view, the same way every time."""
    page.evaluate(f"""() => {{
        const c = {APP}.canvas; c.ds.scale = {scale}; c.ds.offset = [90, 180]; c.setDirty(true, true);
    }}""")
    page.wait_for_timeout(300)


def node_id(page, class_type: str) -> int:
    return page.evaluate(f"() => {APP}.graph.nodes.find(n => n.type === '{class_type}').id")


def widget_values(page, nid: int) -> dict:
    return page.evaluate(f"""() => Object.fromEntries({APP}.graph.getNodeById({nid}).widgets
        .map(w => [w.name, w.value]))""")


def screen_box(page, nid: int, dx: float, dy: float, w: float, h: float) -> dict:
    """A rectangle given in graph units relative to a node's position, in page pixels (for clips and clicks)."""
    return page.evaluate(f"""() => {{
        const app = {APP}, node = app.graph.getNodeById({nid});
        const rect = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + {dx}, node.pos[1] + {dy}]);
        const s = app.canvas.ds.scale;
        return {{x: rect.left + x, y: rect.top + y, width: {w} * s, height: {h} * s}};
    }}""")


def screen_pixels(page, clip: dict) -> np.ndarray:
    """What the screen shows in the clip (RGB), i.e. what a user would actually see."""
    png = page.screenshot(clip=clip)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def colour_pixels(page, clip: dict, rgb: tuple[int, int, int], tol: int = 12) -> int:
    px = screen_pixels(page, clip)
    return int((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).sum())


def redraw(page) -> None:
    page.evaluate(f"() => {APP}.canvas.setDirty(true, true)")
    page.wait_for_timeout(400)


# ---- tests ---------------------------------------------------------------------------------------------

def test_pack_nodes_are_registered_and_found_by_the_node_search(page):
    registered = page.evaluate("""() => Object.fromEntries(Object.keys(LiteGraph.registered_node_types)
        .filter(t => t.startsWith('ZImageTurbo')).map(t => [t, LiteGraph.registered_node_types[t].title]))""")
    for node_type, title in PACK_NODES.items():
        assert registered.get(node_type) == title, (node_type, registered)

    # The search box a user gets by double-clicking empty canvas.
    page.evaluate(f"() => {{ {APP}.graph.clear(); {APP}.canvas.setDirty(true, true); }}")
    box = page.get_by_role("combobox").first
    for attempt in range(3):          # on a loaded machine the frontend may still be settling the cleared graph
        page.wait_for_timeout(500)
        page.mouse.move(800, 500)
        page.mouse.dblclick(800, 500)
        try:
            box.wait_for(timeout=15_000)
            break
        except Exception:  # noqa: BLE001  (playwright's TimeoutError; the last attempt's error is raised below)
            if attempt == 2:
                raise
    box.fill("Z-Image")
    page.wait_for_timeout(1500)
    # every list the search shows (frontends differ in which element holds the results)
    listed = "\n".join(page.get_by_role("listbox").all_inner_texts() + page.get_by_role("option").all_inner_texts())
    found = [title for title in PACK_NODES.values() if title in listed]
    assert "Z-Image Sampler" in found and "Z-Image Save Image" in found, listed[:2000]


def test_bundled_workflow_loads_with_every_node_known(page):
    load_bundled_workflow(page)
    types = page.evaluate(f"() => {APP}.graph.nodes.map(n => n.type).sort()")
    assert types == sorted(["ZImageTurboCheckpointLoader", "EmptyLatentImage", "CLIPTextEncode", "CLIPTextEncode",
                            "ZImageTurboSampler", "ZImageTurboVAEDecode", "ZImageTurboSaveImage"])
    # every node resolved to a registered class (a missing one would be a red placeholder)
    unknown = page.evaluate(f"() => {APP}.graph.nodes.filter(n => n.has_errors || !n.comfyClass).map(n => n.type)")
    assert unknown == []
    sampler = widget_values(page, node_id(page, "ZImageTurboSampler"))
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (12345, 8, 1)


def test_size_preset_sets_width_and_height_and_is_not_sent(page):
    load_bundled_workflow(page)
    latent = node_id(page, "EmptyLatentImage")
    before = widget_values(page, latent)
    assert before["Z-Image size"] == "1024×1024 (1:1)"        # the combo shows the preset the size matches
    presets = page.evaluate(f"""() => {APP}.graph.getNodeById({latent}).widgets
        .find(w => w.name === 'Z-Image size').options.values""")
    sizes = [tuple(int(v) for v in p.split(" ")[0].split("×")) for p in presets if p != "custom"]
    assert sizes and all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
    assert "1360×768 (16:9)" in presets and "1184×880 (4:3)" in presets

    # Pick 16:9 with the mouse, as a user does: click the combo, then the menu entry.
    y = page.evaluate(f"""() => {{ const n = {APP}.graph.getNodeById({latent});
        const w = n.widgets.find(w => w.name === 'Z-Image size'); return (w.y ?? w.last_y) + 10; }}""")
    combo = screen_box(page, latent, 200, y, 1, 1)
    page.mouse.click(combo["x"], combo["y"])
    entry = page.locator(".litemenu-entry", has_text="1360×768 (16:9)")
    entry.first.click(timeout=10_000)
    page.wait_for_timeout(300)
    after = widget_values(page, latent)
    assert (after["width"], after["height"], after["Z-Image size"]) == (1360, 768, "1360×768 (16:9)")

    # What Queue would send: the core node's own inputs only, with the new size.
    api = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output")
    assert api[str(latent)]["inputs"] == {"width": 1360, "height": 768, "batch_size": 1}
    saved = page.evaluate(f"() => {APP}.graph.serialize().nodes.find(n => n.id === {latent}).widgets_values")
    assert saved == [1360, 768, 1]
    redraw(page)


def test_size_node_shows_the_size_it_makes(page):
    """The pack's Size node: picking an aspect shows the preset's pixels and writes them into width/height
    (what 'custom' then starts from); with 'custom' the tag follows width/height."""
    load_bundled_workflow(page)
    nid = page.evaluate(f"""() => {{ const app = {APP}, node = LiteGraph.createNode('ZImageTurboSize');
        node.pos = [60, 560]; app.graph.add(node); return node.id; }}""")
    page.evaluate(f"""() => {{ const w = {APP}.graph.getNodeById({nid}).widgets.find(w => w.name === 'aspect');
        w.value = '16:9'; w.callback?.('16:9'); }}""")
    redraw(page)
    values = widget_values(page, nid)
    assert (values["width"], values["height"]) == (1360, 768)       # nodes/image.py's preset_size('16:9', 1024)
    assert page.evaluate(f"() => {APP}.graph.getNodeById({nid}).zimage.sizeText") == "1360 × 768 px"

    page.evaluate(f"""() => {{ const n = {APP}.graph.getNodeById({nid});
        for (const [k, v] of [['aspect', 'custom'], ['width', 800]]) {{
            const w = n.widgets.find(w => w.name === k); w.value = v; w.callback?.(v); }} }}""")
    redraw(page)
    assert page.evaluate(f"() => {APP}.graph.getNodeById({nid}).zimage.sizeText") == "800 × 768 px"
    api = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output[{nid}].inputs")
    assert (api["aspect"], api["width"], api["height"]) == ("custom", 800, 768)


def test_cfg_hint_appears_above_the_sampler_when_cfg_is_2(page):
    load_bundled_workflow(page)
    sampler = node_id(page, "ZImageTurboSampler")
    above = screen_box(page, sampler, 0, -70, 400, 40)           # the band above the title bar
    redraw(page)
    assert page.evaluate(f"() => {APP}.graph.getNodeById({sampler}).zimage?.cfgHint") is False
    assert colour_pixels(page, above, WARN_RGB) == 0

    page.evaluate(f"""() => {{ const n = {APP}.graph.getNodeById({sampler});
        const w = n.widgets.find(w => w.name === 'cfg'); w.value = 2; w.callback?.(2); }}""")
    redraw(page)
    assert page.evaluate(f"() => {APP}.graph.getNodeById({sampler}).zimage.cfgHint") is True
    assert colour_pixels(page, above, WARN_RGB) > 100, "the red cfg hint is not on screen"


def test_queue_shows_the_image_and_the_seed_and_time(page, server):
    load_bundled_workflow(page)
    latent, sampler, save = (node_id(page, t) for t in ("EmptyLatentImage", "ZImageTurboSampler", "ZImageTurboSaveImage"))
    # A small picture keeps the CPU run short; the graph is otherwise the bundled one.
    page.evaluate(f"""() => {{ const n = {APP}.graph.getNodeById({latent});
        for (const [k, v] of [['width', 256], ['height', 256]]) n.widgets.find(w => w.name === k).value = v; }}""")
    run = page.get_by_role("button", name="Run", exact=True)
    if run.count():
        run.first.click()                                        # the Run (queue) button, as a user does
    else:
        page.evaluate(f"() => {APP}.queuePrompt(0, 1)")
    page.wait_for_function(f"() => ({APP}.graph.getNodeById({save}).imgs || []).length > 0", timeout=240_000)
    page.wait_for_function(f"() => {APP}.graph.getNodeById({save}).zimage?.status", timeout=30_000)
    frame(page)
    redraw(page)

    status = page.evaluate(f"() => {APP}.graph.getNodeById({save}).zimage.status")
    assert status.startswith("seed 12345 · 8 steps · ") and status.endswith(" s · 256×256"), status
    sampler_status = page.evaluate(f"() => {APP}.graph.getNodeById({sampler}).zimage.status")
    assert sampler_status.startswith("seed 12345 · 8 steps · "), sampler_status

    assert widget_values(page, latent)["Z-Image size"] == "custom"     # 256×256 is no preset
    src = page.evaluate(f"() => {APP}.graph.getNodeById({save}).imgs[0].src")
    assert "Ecommerce_ZImage" in src and "type=output" in src
    natural = page.evaluate(f"() => [{APP}.graph.getNodeById({save}).imgs[0].naturalWidth, "
                            f"{APP}.graph.getNodeById({save}).imgs[0].naturalHeight]")
    assert natural == [256, 256]

    size = page.evaluate(f"() => {APP}.graph.getNodeById({save}).size")
    below = screen_box(page, save, 0, size[1] + 4, 400, 26)      # the run-info tag under the save node
    assert colour_pixels(page, below, INFO_RGB) > 50, "the seed/time tag is not on screen"
    shown = screen_pixels(page, screen_box(page, save, 20, 90, size[0] - 40, size[1] - 110))
    assert shown.std() > 20, "no picture drawn in the save node"        # random weights: coloured noise
    files = sorted(server.output.glob("Ecommerce_ZImage*.png"))
    assert files and "Seed: 12345" in Image.open(files[-1]).text["parameters"]


# ---- the sampler's variant preset

NOTE_RGB = (0x26, 0x32, 0x3F)          # the preset note's fill colour in js/zimage_turbo.js
TEMPLATE = " · ComfyUI's template samples with res_multistep"      # what the official templates use


def set_widget(page, nid: int, name: str, value) -> None:
    """As a user's edit: the value, then the widget's callback."""
    page.evaluate(f"""() => {{ const n = {APP}.graph.getNodeById({nid});
        const w = n.widgets.find(w => w.name === {json.dumps(name)}); w.value = {json.dumps(value)};
        w.callback?.(w.value); }}""")
    redraw(page)


def zimage_state(page, nid: int) -> dict:
    return page.evaluate(f"() => {{ const s = {APP}.graph.getNodeById({nid}).zimage; "
                         f"return {{ note: s.variantNote, warnings: s.warnings, cfgHint: s.cfgHint }}; }}")


def test_variant_preset_sets_steps_and_cfg_and_the_canvas_warns(page):
    load_bundled_workflow(page)
    sampler = node_id(page, "ZImageTurboSampler")
    above = screen_box(page, sampler, 0, -130, 600, 100)          # the bands above the title bar
    redraw(page)
    assert widget_values(page, sampler)["variant"] == "turbo"
    assert zimage_state(page, sampler) == {"note": f"Turbo preset: 8 steps · cfg 1{TEMPLATE}", "warnings": [],
                                           "cfgHint": False}
    assert colour_pixels(page, above, NOTE_RGB) > 100 and colour_pixels(page, above, WARN_RGB) == 0

    set_widget(page, sampler, "variant", "base")                  # the preset writes steps and cfg
    values = widget_values(page, sampler)
    assert (values["steps"], values["cfg"]) == (50, 4)
    assert zimage_state(page, sampler) == {"note": f"Base preset: 50 steps · cfg 4{TEMPLATE}", "warnings": [],
                                           "cfgHint": False}
    assert colour_pixels(page, above, WARN_RGB) == 0

    set_widget(page, sampler, "steps", 8)                         # Base at Turbo's steps, no LoRA upstream
    state = zimage_state(page, sampler)
    assert "(edited)" in state["note"] and len(state["warnings"]) == 1
    assert "distill LoRA" in state["warnings"][0]
    assert colour_pixels(page, above, WARN_RGB) > 100, "the red Base-steps warning is not on screen"

    api = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output[{sampler}].inputs")
    assert (api["variant"], api["steps"], api["cfg"], api["cfg_normalization"], api["cfg_truncation"]) == \
        ("base", 8, 4, 0, 1)

    set_widget(page, sampler, "variant", "turbo")
    assert widget_values(page, sampler)["steps"] == 8 and zimage_state(page, sampler)["warnings"] == []
    set_widget(page, sampler, "cfg", 2)
    assert zimage_state(page, sampler)["cfgHint"] is True


def test_a_canvas_workflow_saved_before_the_new_inputs_loads_with_their_defaults(page):
    """widgets_values without variant / cfg_normalization / cfg_truncation (as every workflow saved before them):
    the values it has stay where they were, the new ones take their defaults, and loading applies no preset."""
    wf = json.loads((REPO / "example_workflows" / "ecommerce_turbo.json").read_text(encoding="utf-8"))
    node = next(n for n in wf["nodes"] if n["type"] == "ZImageTurboSampler")
    node["widgets_values"] = [777, "fixed", 12, 1.0, 3.0, 1.0]
    page.evaluate(f"async (wf) => {APP}.loadGraphData(wf)", wf)
    page.wait_for_function(f"() => {APP}.graph.nodes.length === 7")
    frame(page)
    values = widget_values(page, node["id"])
    assert (values["seed"], values["steps"], values["cfg"], values["variant"], values["cfg_normalization"],
            values["cfg_truncation"], values["sampler_name"], values["scheduler"]) == \
        (777, 12, 1.0, "turbo", 0.0, 1.0, "euler", "simple")
