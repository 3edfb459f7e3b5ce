"""The seam with ComfyUI (nodes/comfy_compat.py): every version probe evaluated on each supported ComfyUI, in a
process of its own (one ComfyUI per process), against what each version is known to do; and no other module of
nodes/ probing a version or reaching into core's private state."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree

# what each supported ComfyUI does, probe by probe (nodes/comfy_compat.py says why each matters)
EXPECTED = {
    "0.30.0": {"archive_model_dtypes": True, "CoreModelPatcher": True, "CAST_TAKES_COMPUTE_DTYPE": True,
               "lowvram_patch_converts": False, "PER_LAYER_QUANT": True, "CLIP_TAKES_STATE_DICT": True,
               "zimage_control_class": True, "clone_takes_disable_dynamic": True},
    "0.3.75": {"archive_model_dtypes": False, "CoreModelPatcher": False, "CAST_TAKES_COMPUTE_DTYPE": False,
               "lowvram_patch_converts": True, "PER_LAYER_QUANT": False, "CLIP_TAKES_STATE_DICT": False,
               "zimage_control_class": False, "clone_takes_disable_dynamic": False},
}
# formats each version computes on the CPU here (0.30.0 with comfy_kitchen's eager kernels)
FORMATS = {"0.30.0": {"float8_e4m3fn", "int8_tensorwise", "nvfp4", "mxfp8"}, "0.3.75": {"float8_e4m3fn"}}

# what only comfy_compat may do: version probes and core's private state
FORBIDDEN = [r"hasattr\((comfy|mm)\.", r"getattr\((comfy|mm)\.", r"inspect\.signature\(comfy", "cached_patcher_init",
             "class_obj", "object_patches", "comfy_need_lazy_init_bias", "_CK_AVAILABLE", r"\.wrappers\b",
             r"latent_channels\s*=", "first_stage_model", "LowVramPatch", "comfy.ldm.lumina.controlnet",
             r"model\.device\s*="]


def report(version: str) -> dict:
    comfyui_tree(version)
    code = ("import json, sys\n"
            "from zimage_dev import comfy_tree\n"
            f"comfy_tree.import_comfy({version!r}, cpu=True)\n"
            "compat = comfy_tree.import_pack('nodes.comfy_compat')\n"
            "print('REPORT' + json.dumps(compat.probe_report()))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("REPORT"))[len("REPORT"):])


@pytest.mark.parametrize("version", EXPECTED)
def test_every_probe_gives_what_the_version_does(version):
    got = report(version)
    print(f"ComfyUI {version} ({got['version']}): {json.dumps({k: got[k] for k in EXPECTED[version]})}; "
          f"formats {got['computable_quant_formats']}; {len(got['seams'])} seams")
    wrong = {k: got[k] for k, v in EXPECTED[version].items() if got[k] != v}
    assert not wrong, f"ComfyUI {version} changed what these probes find: {wrong}"
    assert set(got["computable_quant_formats"]) >= FORMATS[version], got["computable_quant_formats"]


def test_no_other_node_module_probes_versions_or_private_state():
    found = []
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.name == "comfy_compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            found += [f"{path.name}:{n}: {line.strip()}" for pattern in FORBIDDEN if re.search(pattern, code)]
    assert not found, "version probes or core's private state outside nodes/comfy_compat.py:\n" + "\n".join(found)


def test_every_seam_says_what_it_serves_and_when_it_goes():
    source = (REPO / "nodes" / "comfy_compat.py").read_text()
    seams = re.findall(r'^@seam\("(version|private)"', source, re.M) + re.findall(r'Seam\("\w+", "(version|private)"',
                                                                                   source)
    assert len(seams) >= 20, seams
