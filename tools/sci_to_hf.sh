#!/usr/bin/env bash
# Export a sci-scale checkpoint as a Hugging Face model directory, then check that transformers
# loads it and gives sci-scale's logits (a fused SCI branch loads with trust_remote_code).
#   tools/sci_to_hf.sh CKPT OUT_DIR [--dtype bf16|fp16|fp32|keep] [--max-shard-size 5GB]
set -euo pipefail
[ "$#" -ge 2 ] || { echo "usage: $0 CKPT OUT_DIR [sci-scale export options]" >&2; exit 2; }
ckpt=$1 out=$2
shift 2
SCI="${SCI_SCALE:-$(dirname "$0")/../.venv/bin/sci-scale}"
"$SCI" export --ckpt "$ckpt" --out "$out" "$@"
remote=()
if grep -q '"auto_map"' "$out/config.json"; then remote=(--trust-remote-code); fi
case " $* " in
  *" keep "* | *"--dtype=keep"* | *" fp32 "* | *"--dtype=fp32"*)
    "$SCI" convert verify --ckpt "$ckpt" --hf "$out" "${remote[@]}" ;;
  *)
    # bf16 (the default) or fp16 weights differ from an fp32 checkpoint by their rounding.
    "$SCI" convert verify --ckpt "$ckpt" --hf "$out" "${remote[@]}" ||
      echo "(a bf16/fp16 export of an fp32 checkpoint: the difference is the weights' rounding)" ;;
esac
