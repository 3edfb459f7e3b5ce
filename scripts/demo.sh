#!/usr/bin/env bash
# The demo: build the runtime if needed, then run the turbo pipeline on tiny random weights; prints the PNG path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup_runtime.sh" >/dev/null
exec "$here/.runtime/venv/bin/python" "$here/scripts/demo.py" "$@"
