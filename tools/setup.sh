#!/usr/bin/env bash
# Create ./.venv with sci-scale and its test tools installed (idempotent; safe to re-run).
#
# CPU machines get torch 2.13.0's CPU build, which pip finds on local disk here; an unpinned
# torch would pull a multi-GB CUDA build. On a GPU machine set SCI_SCALE_TORCH to the torch
# requirement you want (e.g. SCI_SCALE_TORCH="torch==2.13.0" with your CUDA index), or install
# torch into the venv first: an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SCI_SCALE_VENV:-.venv}"
TORCH_REQ="${SCI_SCALE_TORCH:-torch==2.13.0}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "sci-scale needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "[setup] installing $TORCH_REQ"
    "${PIP[@]}" install "$TORCH_REQ"
fi
echo "[setup] installing sci-scale (editable) with test extras"
# DeepSpeed ships as a source distribution: DS_BUILD_OPS=0 installs it as pure Python (its few
# CPU ops are JIT-built on first use), with no CUDA toolkit needed.
DS_BUILD_OPS=0 "${PIP[@]}" install -e ".[test]"
echo "[setup] ready: $VENV/bin/sci-scale"
