#!/usr/bin/env bash
# The SCI branch's step-time cost on this machine: the default config with and without the
# branch, alternating steps in one process. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/sci-scale bench configs/tiny.yaml "$@" --steps "${STEPS:-40}" --warmup 5
