#!/usr/bin/env bash
# The test command of the README: set up (idempotent, fast when warm), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMSERVE_VENV:-$HOME/.cache/llmserve/venv}"
hack/setup.sh
exec "$VENV/bin/python" -m pytest "$@"
