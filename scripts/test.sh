#!/usr/bin/env bash
# The test command: build the runtime if needed (torch, diffusers, transformers, two ComfyUI trees), run pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup_runtime.sh"
bash "$here/scripts/setup_browser.sh"   # Chromium for tests/test_browser.py (skips there, with the reason, if it cannot)
cd "$here"
# The suite writes ~10 GB of fixtures (a 5.3 GB shared cache, server tests' temp files): say what the disk had.
df -h "$here" "${TMPDIR:-/tmp}" | sed "s/^/disk: /"
exec .runtime/venv/bin/python -m pytest "$@"
