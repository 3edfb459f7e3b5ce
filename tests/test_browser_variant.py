"""The sampler's variant preset on the canvas (js/zimage_turbo.js), in ComfyUI's real frontend in headless Chromium,
with test_browser.py's server / browser / page fixtures (both ComfyUI versions, each with the frontend it pins)."""
from __future__ import annotations

import json

from conftest import REPO
from test_browser import (APP, WARN_RGB, browser, colour_pixels, frame, load_bundled_workflow, node_id,  # noqa: F401
                          page, redraw, screen_box, server, widget_values)

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
