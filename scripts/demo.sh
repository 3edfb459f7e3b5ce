#!/usr/bin/env bash
# The demo: build the runtime if needed, then run the turbo pipeline on tiny random weights; prints the PNG path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup_runtime.sh" >/dev/null
# scripts/ and the harness (zimage_dev/) are imported from the repository root
cd "$here"
exec .runtime/venv/bin/python -m scripts.demo "$@"
