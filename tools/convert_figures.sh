#!/usr/bin/env bash
# Conversion time and peak memory on this machine for a random 1.24B-parameter Llama-3.2-1B-shaped
# model (bf16 safetensors, tied embeddings, llama3 RoPE scaling factor 32), built offline:
# import, the sharded bf16 export (1 GB shards), the logits check, and the round trip's tensor
# equality.
#   tools/convert_figures.sh [WORK_DIR]   (needs ~10 GB of memory and ~10 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SCI=.venv/bin/sci-scale
work=${1:-/tmp/sci-scale-convert-figures}
mkdir -p "$work"
"$PY" - "$work/hf" <<'PY'
import sys, torch, transformers
cfg = transformers.LlamaConfig(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
print(f"random model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")
model.save_pretrained(sys.argv[1])
PY
measure() {  # label, command...: wall time and peak RSS of one command
  local label=$1
  shift
  /usr/bin/time -f "$label: %e s wall, %M KB peak RSS" "$@" 2>&1 | grep -E "^$label:|logits"
}
measure import "$SCI" convert hf-to-sci --hf "$work/hf" --out "$work/ckpt"
measure export "$SCI" export --ckpt "$work/ckpt" --out "$work/export" --max-shard-size 1GB
measure verify "$SCI" convert verify --ckpt "$work/ckpt" --hf "$work/hf" --seq 64
"$PY" - "$work" <<'PY'
import sys, torch
from safetensors.torch import load_file
from pathlib import Path
a = load_file(f"{sys.argv[1]}/hf/model.safetensors")
files = sorted(Path(sys.argv[1], "export").glob("model-*.safetensors"))
b = {k: v for f in files for k, v in load_file(f).items()}
same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
print(f"round trip: {len(a)} tensors, {'all bit-identical' if same else 'DIFFERENT'}; "
      f"export in {len(files)} shards of <= 1 GB")
PY
