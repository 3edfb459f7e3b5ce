"""The real-server harness itself (tests/comfy_server.py, fixture `comfy` in conftest.py), on ComfyUI 0.30.0 and
0.3.75: the server starts with the pack in custom_nodes/, imports it cleanly, runs a core-only workflow posted
to /prompt, and answers a malformed one with HTTP 400 naming the input while it keeps serving.
These tests use core nodes only, so they hold whatever nodes the pack registers."""
from __future__ import annotations

import re

import pytest
from PIL import Image

PACK = "comfyui_zimage_turbo"


def blank_image_job(width: int, height: int, batch: int = 1, color: int = 0x3366CC,
                    prefix: str = "harness") -> dict:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": width, "height": height, "batch_size": batch, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def tracebacks(log: str) -> list[str]:
    """Each 'Traceback ...' block of the log, up to and including its exception line. The marker may follow a
    logging prefix ("[WARNING] Traceback ..." in 0.30.0)."""
    blocks, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            end = i + 1
            while end < len(lines) and (lines[end].startswith(" ") or not lines[end].strip()):
                end += 1
            blocks.append("\n".join(lines[i:end + 1]))
    return blocks


def test_core_nodes_are_listed(comfy):
    info = comfy.object_info()
    for node in ("KSampler", "SaveImage", "EmptyImage", "CheckpointLoaderSimple", "VAEDecode", "CLIPTextEncode"):
        assert node in info, f"{node} missing from /object_info of ComfyUI {comfy.version}"
    assert info["SaveImage"]["output_node"] is True


def test_pack_is_imported_without_failure(comfy):
    log = comfy.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    assert not failed, "ComfyUI reports failed imports:\n" + "\n".join(failed) + "\n" + comfy.log_tail()
    assert re.search(rf"seconds: \S*custom_nodes/{PACK}\s*$", log, re.M), \
        f"the pack is not in ComfyUI's custom-node import list:\n{comfy.log_tail()}"
    bad = [tb for tb in tracebacks(log) if PACK in tb or str(comfy.pack) in tb]
    assert not bad, "tracebacks from the pack:\n" + "\n\n".join(bad)
    assert not re.search(rf"Cannot import \S*{PACK}", log)


def test_core_workflow_writes_pngs_of_the_requested_size(comfy):
    entry = comfy.run(blank_image_job(72, 40, batch=2), timeout=60)
    assert entry["status"]["status_str"] == "success"
    files = comfy.output_files(entry)
    assert len(files) == 2 and all(f.name.startswith("harness") and f.suffix == ".png" for f in files), files
    for f in files:
        with Image.open(f) as image:
            assert image.format == "PNG" and image.size == (72, 40)      # (width, height): not swapped
            assert image.convert("RGB").getpixel((5, 5)) == (0x33, 0x66, 0xCC)


@pytest.mark.parametrize("node,edit,input_name,error_type", [
    ("2", lambda wf: wf["2"]["inputs"].pop("images"), "images", "required_input_missing"),
    ("1", lambda wf: wf["1"]["inputs"].update(width=0), "width", "value_smaller_than_min"),
], ids=["SaveImage-without-images", "EmptyImage-width-0"])
def test_bad_request_is_400_naming_the_input_and_the_server_keeps_serving(comfy, node, edit, input_name,
                                                                          error_type):
    wf = blank_image_job(16, 16, prefix="never_written")
    edit(wf)
    status, body = comfy.post_prompt(wf)
    assert status == 400, body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"][node]["errors"]
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [(error_type, input_name)], errors
    assert not list(comfy.output.glob("never_written*"))
    files = comfy.output_files(comfy.run(blank_image_job(24, 8, prefix=f"after_bad_{input_name}"), timeout=60))
    with Image.open(files[0]) as image:
        assert image.size == (24, 8)


def test_interrupt_with_nothing_running_is_harmless(comfy):
    assert comfy.interrupt() == 200
    assert comfy.run(blank_image_job(8, 8, prefix="after_interrupt"), timeout=60)["status"]["status_str"] == "success"
