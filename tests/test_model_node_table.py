"""The MODEL node survey (scripts/model_node_table.py, which writes docs/model_nodes.md) on a few representative
core nodes, through the same code, in a real ComfyUI 0.30.0 server on the full-width Z-Image file.

Each node runs on the pack's MODEL and on core's UNETLoader MODEL; the survey's verdict must be the one expected
for it: core's own patches act the same on both (and the LoRA and the guider visibly act, or the comparison
would prove nothing), a UNet-only patch is refused by both with the same error, and nodes that cannot run here
are reported as such without running."""
from __future__ import annotations

import json

import pytest

from zimage_dev.runtime import comfyui_tree
from scripts import model_node_table as survey

VERSION = "0.30.0"
EXPECTED = {
    "ModelSamplingAuraFlow": survey.SAME,      # replaces the model's sampling object: core's class on both
    "LoraLoaderModelOnly": survey.SAME,        # core's weight patches (the first LoRA file: ai-toolkit keys)
    "CFGGuider": survey.SAME,                  # a GUIDER at its default cfg 8, sampled by SamplerCustomAdvanced
    "RescaleCFG": survey.SAME,                 # a sampler_cfg_function patch
    "BasicScheduler": survey.SAME,             # SIGMAS from the model's own sampling, sampled by SamplerCustom
    "FreeU_V2": survey.REFUSED,                # a UNet patch: reads model_channels, which a DiT's config lacks
    "UNETLoader": survey.NA,                   # makes a MODEL, takes none
    "USOStyleReference": survey.NA,            # needs CLIP vision output, which nothing here makes
}
# The fixture must be strong enough to tell: these change the image, so "same as core" is not trivially true.
MUST_CHANGE = ("LoraLoaderModelOnly", "CFGGuider")


@pytest.fixture(scope="module")
def rows():
    comfyui_tree(VERSION)                       # skips, naming the setup script, when the tree is missing
    return {r["node"]: r for r in survey.survey_version(VERSION, list(EXPECTED))}


@pytest.mark.parametrize("node", EXPECTED)
def test_survey_verdict(rows, node):
    row = rows[node]
    print(f"{VERSION} {node}: {row['result']}: {row['note']}")
    assert row["result"] == EXPECTED[node], row["note"]
    if node in MUST_CHANGE:
        assert row["effect"] > 10, f"{node} did not change the image: the comparison would prove nothing"


def test_refusal_names_the_cause(rows):
    assert "model_channels" in rows["FreeU_V2"]["note"]
    assert "CLIP_VISION_OUTPUT" in rows["USOStyleReference"]["note"]


def test_table_counts_match_rows(rows, tmp_path):
    md, js = tmp_path / "model_nodes.md", tmp_path / "model_nodes.json"
    survey.write_table({VERSION: list(rows.values())}, md, js)
    counts = json.loads(js.read_text())["counts"][VERSION]
    assert counts == {survey.SAME: 5, survey.DIFFERS: 0, survey.REFUSED: 1, survey.NA: 2}
    text = md.read_text()
    assert f"**ComfyUI {VERSION}**: 8 MODEL nodes: 5 same as core, 0 DIFFERS, 1 refused by both, 2 not applicable" in text
    assert "| FreeU_V2 | model/patch/unet | refused by both |" in text


def test_a_tensor_difference_names_the_tensors_apart(tmp_path):
    """An output node's DIFFERS row names the tensors apart, so a cause like 0.3.75's uninitialised norm_final
    (core's loader never fills it) is checked against the run, not assumed."""
    import torch
    from safetensors.torch import save_file
    same = torch.arange(6.0).reshape(2, 3)
    save_file({"a": same, "model.diffusion_model.norm_final.weight": torch.ones(3)}, str(tmp_path / "pack.safetensors"))
    save_file({"a": same, "model.diffusion_model.norm_final.weight": torch.zeros(3)}, str(tmp_path / "core.safetensors"))
    row = survey.classify({"files": [str(tmp_path / "pack.safetensors")]},
                          {"files": [str(tmp_path / "core.safetensors")]}, {"files": []})
    assert row["result"] == survey.DIFFERS and row["diff"] == 1.0
    assert row["apart"] == ["model.diffusion_model.norm_final.weight"]
    assert set(row["apart"]) <= survey.UNREAD_BY_CORE
