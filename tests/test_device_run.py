"""bench/device_run.sh refuses, with a message that says why, a machine its carried bundle does not fit: the
checks run here, on a bundle of the same file names (the wheels' tags are what the script reads)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KITCHEN = "comfy_kitchen-0.2.26-{tag}-{tag}-manylinux_2_28_x86_64.whl"
HERE = f"cp{sys.version_info.major}{sys.version_info.minor}"


def run_with_bundle(tmp_path: Path, tag: str) -> subprocess.CompletedProcess:
    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / KITCHEN.format(tag=tag)).write_bytes(b"")
    (wheels / "torchsde-0.2.6-py3-none-any.whl").write_bytes(b"")
    env = {**os.environ, "PYTHON": sys.executable, "ZIMAGE_DEVICE_DIR": str(tmp_path / "bundle"),
           "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(REPO / "bench" / "device_run.sh")], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def test_a_python_the_wheels_were_not_built_for_is_named(tmp_path):
    """The bundle's compiled wheels are cp312; this venv's Python is not, as a lent machine's may not be."""
    other = "cp312" if HERE != "cp312" else "cp310"
    result = run_with_bundle(tmp_path, other)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"built for {other} (CPython {other[2]}.{other[3:]})" in result.stderr, result.stderr
    assert f"({HERE})" in result.stderr and "PYTHON" in result.stderr
    assert not (tmp_path / "out").exists()                 # refused before installing or running anything


def test_a_matching_python_without_a_cuda_device_is_named(tmp_path):
    """This machine's torch (a CUDA build) sees no GPU: the next check, reached once the Python matches."""
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a CUDA device is visible: the script would go on to install and run the benchmark")
    result = run_with_bundle(tmp_path, HERE)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"torch {torch.__version__} here sees no CUDA device" in result.stderr, result.stderr
    assert "carried wheels" not in result.stderr
