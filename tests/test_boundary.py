"""The core package never imports ComfyUI."""
import subprocess
import sys

from conftest import REPO

MODULES = ["checkpoint", "config", "dit", "errors", "fastpath", "formats", "keys", "layers", "loading", "lora", "memory", "pipeline",
           "precision", "quant", "rope", "sampling", "synthetic", "text_encoder", "tokenizer", "vae"]


def test_core_imports_with_comfy_blocked():
    code = ("import sys\n"
            "for name in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server', 'comfy_extras'):\n"
            "    sys.modules[name] = None\n"
            + "".join(f"import zimage_core.{m}\n" for m in MODULES) +
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_core_module_is_checked():
    found = sorted(p.stem for p in (REPO / "zimage_core").glob("*.py") if p.stem != "__init__")
    assert found == sorted(MODULES)
