#!/usr/bin/env bash
# Import a Hugging Face model directory as a sci-scale checkpoint (Llama, Mistral, Qwen2, SmolLM2),
# then check its logits against transformers' on a random batch.
#   tools/hf_to_sci.sh HF_DIR OUT_CKPT [--tp N --pp M --dtype bf16 ...]
set -euo pipefail
[ "$#" -ge 2 ] || { echo "usage: $0 HF_DIR OUT_CKPT [convert hf-to-sci options]" >&2; exit 2; }
hf_dir=$1 out=$2
shift 2
SCI="${SCI_SCALE:-$(dirname "$0")/../.venv/bin/sci-scale}"
"$SCI" convert hf-to-sci --hf "$hf_dir" --out "$out" "$@"
"$SCI" convert verify --ckpt "$out" --hf "$hf_dir"
