"""The code passes ruff with pyproject.toml's rules, and the pre-commit hook runs ruff and the fast tier."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from zimage_dev import REPO


def test_ruff_passes():
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), f"{ruff} is missing: run scripts/setup_runtime.sh (ruff comes with the test extras)"
    out = subprocess.run([str(ruff), "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]


def test_the_pre_commit_hook_runs_the_linter_and_the_fast_tier():
    hook = REPO / ".githooks" / "pre-commit"
    assert os.access(hook, os.X_OK)
    lines = [line.strip() for line in hook.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ".runtime/venv/bin/ruff check ." in lines
    assert "bash scripts/test.sh -m fast -q" in lines          # README's fast command
    assert "bash scripts/test.sh -m fast" in (REPO / "README.md").read_text()


def test_architecture_s_hook_command_turns_the_hook_on(tmp_path):
    """ARCHITECTURE.md's command, exactly as written, in a clone of this repository."""
    command = next(line.strip("` ") for line in (REPO / "ARCHITECTURE.md").read_text().split("`")
                   if line.startswith("git config core.hooksPath"))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True, timeout=120)
    subprocess.run(command, shell=True, cwd=clone, check=True, timeout=30)
    got = subprocess.run(["git", "config", "core.hooksPath"], cwd=clone, capture_output=True, text=True, timeout=30)
    assert got.stdout.strip() == ".githooks"
