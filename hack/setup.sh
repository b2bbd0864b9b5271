#!/usr/bin/env bash
# Installs everything the test bed, the tests and the quickstart need on a fresh machine:
# Debian's prometheus, a Python venv with llmserve and its extras, the pinned Go-built
# Kubernetes/etcd/KWOK/Helm binaries, the prometheus-adapter and LeaderWorkerSet binaries some
# tests start (built here, not inside a test's timeout) and the engine environments (all cached
# under ~/.cache/llmserve, built once).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMSERVE_VENV:-$HOME/.cache/llmserve/venv}"
EXTRAS="${LLMSERVE_EXTRAS:-dev,operator,testbed,build,predictor,models}"

if ! command -v prometheus >/dev/null 2>&1; then
  echo "[setup] installing Debian's prometheus" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
command -v go >/dev/null 2>&1 || { echo "[setup] Go >= 1.24 is required (https://go.dev/doc/install)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip setuptools wheel
fi
echo "[setup] installing llmserve[$EXTRAS] into $VENV (first time downloads torch, ~5 GB)" >&2
"$VENV/bin/pip" install -q --progress-bar off -e ".[$EXTRAS]"
"$VENV/bin/llmserve" testbed build
# The ONNX Runtime engine environment the test bed's Triton runs model_repo/generate and embedding in:
# their requirements.txt, the lists model_repo/Dockerfile installs into the runtime image (onnxruntime's
# CPU build for onnxruntime-gpu), so a package missing from the image fails a test here.
echo "[setup] ONNX Runtime engine environment (llmserve testbed engine-env onnxruntime)" >&2
"$VENV/bin/llmserve" testbed engine-env onnxruntime
# The vLLM engine environment the test bed's Triton runs model_repo/vllm in (python of the venv, so
# it matches the python-backend stub): model_repo/vllm/requirements.txt with vLLM's CPU build.
# Skipped in seconds when current; the first time downloads torch and vLLM's dependencies (~10 GB).
echo "[setup] vLLM engine environment (llmserve testbed engine-env vllm)" >&2
"$VENV/bin/llmserve" testbed engine-env vllm
# The compression environment `llmserve compress --method w8a8|w4a16` runs llmcompressor in
# (hack/engine-compress.txt says why it is separate). Skipped when its stamp matches the list.
COMPRESS_ENV="${LLMSERVE_COMPRESS_ENV:-$HOME/.cache/llmserve/engine-compress}"
COMPRESS_STAMP="$(sha256sum hack/engine-compress.txt | cut -d' ' -f1)"
if [ "$(cat "$COMPRESS_ENV/.llmserve-requirements.sha256" 2>/dev/null)" != "$COMPRESS_STAMP" ]; then
  echo "[setup] compression environment $COMPRESS_ENV (llmcompressor; first time downloads torch)" >&2
  [ -x "$COMPRESS_ENV/bin/python" ] || "$VENV/bin/python" -m venv "$COMPRESS_ENV"
  "$COMPRESS_ENV/bin/python" -m pip install -q --progress-bar off -r hack/engine-compress.txt
  echo "$COMPRESS_STAMP" > "$COMPRESS_ENV/.llmserve-requirements.sha256"
fi
echo "[setup] done: activate with  source $VENV/bin/activate" >&2
