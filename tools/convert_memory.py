"""Peak memory of a Hugging Face round trip at real size: `sci-scale convert hf-to-sci`, then
`sci-scale export`, on a random Llama-shaped model made here (never downloaded).

Each conversion runs as its own process; a sampler reads its resident memory (psutil, every
20 ms) and the process's own report of its peak (the kernel's high-water mark) is read from
its log. Every tensor of the export is compared with the original. Prints a table and, last, one
JSON line with the figures.

    python tools/convert_memory.py --hidden 2048 --layers 8 --shard-size 500MB --workdir /tmp/cm
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file

GB = 1e9


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    heads = hidden // 128
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(hidden * 2.75),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                f"{p}input_layernorm.weight": (h,),
                f"{p}self_attn.q_proj.weight": (h, h),
                f"{p}self_attn.k_proj.weight": (kv, h),
                f"{p}self_attn.v_proj.weight": (kv, h),
                f"{p}self_attn.o_proj.weight": (h, h),
                f"{p}post_attention_layernorm.weight": (h,),
                f"{p}mlp.gate_proj.weight": (f, h),
                f"{p}mlp.up_proj.weight": (f, h),
                f"{p}mlp.down_proj.weight": (h, f),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def build_random_llama(directory: Path, config: dict, shard_bytes: int, seed: int = 0) -> Path:
    """A sharded HF directory (config, safetensors shards, index), one shard in memory at a
    time."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, weight_map, files = 0, {}, []

    def flush() -> None:
        name = f"part-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[0], name))
        files.append(name)
        shards[0] = {}

    for name, shape in tensor_shapes(config).items():
        tensor = torch.randn(shape, generator=generator) * 0.02
        if name.endswith("norm.weight"):
            tensor = 1.0 + tensor
        nbytes = tensor.numel() * 4
        if shards[0] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[0][name] = tensor
        size += nbytes
    flush()
    index = {"metadata": {"total_size": sum((directory / f).stat().st_size for f in files)}}
    index["weight_map"] = weight_map
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def run_sampled(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; its peak resident memory as sampled (GB), as it reports it (GB), its log."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        handle = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = handle.memory_info().rss
                rss += sum(c.memory_info().rss for c in handle.children(recursive=True))
            except psutil.Error:
                break
            peak[0] = max(peak[0], rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    reported = re.findall(r"peak memory ([\d.]+) GB", out)
    return peak[0] / GB, float(reported[-1]) * 2**30 / GB if reported else float("nan"), out


def compare(src: Path, out: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ), one tensor in memory at a time."""

    def index(d: Path) -> dict[str, Path]:
        weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        return {k: d / v for k, v in weight_map.items()}

    a, b = index(src), index(out)
    if set(a) != set(b):
        raise SystemExit(f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    differ = 0
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            differ += not torch.equal(fa.get_tensor(name), fb.get_tensor(name))
    return len(a), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="500MB", help="input and export shard size")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the model directories")
    args = parser.parse_args()
    from huggingface_hub.serialization._base import parse_size_to_int

    shard = parse_size_to_int(args.shard_size)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    config = llama_config(args.hidden, args.layers, args.vocab)
    t0 = time.perf_counter()
    src = build_random_llama(work / "hf", config, shard)
    model_gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / GB
    print(f"random Llama: {model_gb:.2f} GB in {time.perf_counter() - t0:.0f}s -> {src}")
    cli = [sys.executable, "-m", "sci_scale"]
    imp = run_sampled([*cli, "convert", "hf-to-sci", "--hf", str(src), "--out", str(work / "ckpt")])
    exp = run_sampled(
        [*cli, "export", "--ckpt", str(work / "ckpt"), "--out", str(work / "out"),
         "--max-shard-size", args.shard_size, "--dtype", "keep"]
    )  # fmt: skip
    compared, differ = compare(src, work / "out")
    largest_in = max(p.stat().st_size for p in src.glob("*.safetensors")) / GB
    out_files = sorted((work / "out").glob("*.safetensors"))
    largest_out = max(p.stat().st_size for p in out_files) / GB
    figures = {
        "model_gb": round(model_gb, 3),
        "parameters": sum(int(torch.tensor(s).prod()) for s in tensor_shapes(config).values()),
        "shard_size": args.shard_size,
        "largest_input_shard_gb": round(largest_in, 3),
        "largest_export_shard_gb": round(largest_out, 3),
        "export_files": len(out_files),
        "import_peak_rss_gb": round(imp[0], 3),
        "import_reported_peak_gb": round(imp[1], 3),
        "import_bound_gb": round(1.5 * largest_in + 1, 3),
        "export_peak_rss_gb": round(exp[0], 3),
        "export_reported_peak_gb": round(exp[1], 3),
        "export_bound_gb": round(1.5 * largest_out + 1, 3),
        "tensors_compared": compared,
        "tensors_different": differ,
    }
    print(f"{'step':<8} {'peak RSS (sampled)':>19} {'peak (reported)':>16} {'bound':>8}")
    for step in ("import", "export"):
        sampled, reported = figures[f"{step}_peak_rss_gb"], figures[f"{step}_reported_peak_gb"]
        bound = figures[f"{step}_bound_gb"]
        print(f"{step:<8} {sampled:>16.2f} GB {reported:>13.2f} GB {bound:>5.2f} GB")
    print(f"{compared} tensors compared, {differ} differ; export in {len(out_files)} files")
    if not args.keep:
        for sub in ("hf", "ckpt"):
            shutil.rmtree(work / sub, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
