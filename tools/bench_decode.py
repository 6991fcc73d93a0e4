"""Greedy decoding with and without megatron's KV cache, on a small random model.

Builds a random sci-scale model (SCI branch fused, gate open), decodes ``--prompts`` prompts
of SCAN-like lengths (8-12 tokens) for exactly ``--max-new-tokens`` tokens each (no targets
and an end token the model never produces, so every row runs the whole budget, like SCAN's
longest outputs), with the cache and by full recomputation (alternating, ``--repeats`` times
each; the fastest of each counts, which damps other load on the machine), and prints both
wall times, the speed-up and whether the outputs are identical (exit status 1 if not).

    .venv/bin/python tools/bench_decode.py
    .venv/bin/python tools/bench_decode.py --prompts 256 --layers 8 --hidden 256 --sci-off
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sci_scale.checkpoint.load import single_process, whole_model_config
from sci_scale.config import load_config
from sci_scale.eval.generalization import GreedyGenerator
from sci_scale.model.gpt import SCIGPTModel
from sci_scale.runtime.distributed import seed_everything


class WordTokenizer:
    """Token ``i`` is the word ``t<i>``; the end token is outside the vocabulary."""

    eod = -1

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [[int(w[1:]) for w in t.split()] for t in texts]

    def detokenize(self, ids) -> str:
        return " ".join(f"t{int(i)}" for i in ids)


def build(args: argparse.Namespace, run_dir: Path) -> SCIGPTModel:
    overrides = [
        f"run.dir={run_dir}",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups}",
        "model.seq_length=128",
        "model.transformer_impl=local",
        "model.init_method_std=0.2",  # clear maxima: the comparison is not decided by ties
        "sci.mode=off" if args.sci_off else "sci.fuse_layer=1",
        "sci.hidden_size=64",
        "sci.num_layers=2",
        "logging.wandb_mode=disabled",
    ]
    seed_everything(0)
    model = SCIGPTModel(whole_model_config(load_config(None, overrides)), vocab_size=args.vocab)
    if model.sci is not None:
        with torch.no_grad():
            model.sci.gate.normal_(std=1.0)  # an open gate: the branch shapes every step
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48, help="SCAN's longest output: 48")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--sci-off", action="store_true", help="no SCI branch (sci.mode=off)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("megatron").setLevel(logging.WARNING)

    rng = np.random.default_rng(0)
    prompts = [
        " ".join(f"t{i}" for i in rng.integers(0, args.vocab, size=rng.integers(8, 13)))
        for _ in range(args.prompts)
    ]
    with tempfile.TemporaryDirectory() as tmp, single_process():
        model = build(args, Path(tmp) / "run")
        branch = "off" if model.sci is None else "fused at layer 1"
        print(
            f"model: {model.spec_name}, {args.layers} layers, hidden {args.hidden}, SCI "
            f"{branch}, {model.device}; {args.prompts} prompts of 8-12 tokens, "
            f"{args.max_new_tokens} new tokens each"
        )
        times: dict[bool, float] = {True: float("inf"), False: float("inf")}
        outputs = {}
        for kv_cache in [True, False] * args.repeats:
            generator = GreedyGenerator(
                model, WordTokenizer(), args.vocab, args.max_new_tokens, args.batch_size,
                kv_cache=kv_cache,
            )  # fmt: skip
            if not generator.kv_cache and kv_cache:
                print("this model cannot use the KV cache (not the local spec)")
                return 1
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[kv_cache] = generator.generate(prompts)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[kv_cache] = min(times[kv_cache], time.perf_counter() - start)
    tokens = sum(len(c.text.split()) for c in outputs[True])
    assert tokens == args.prompts * args.max_new_tokens, "every row should run the whole budget"
    for kv_cache, label in ((True, "KV cache"), (False, "full recomputation")):
        print(f"{label:>20}: {times[kv_cache]:8.2f} s  ({tokens / times[kv_cache]:8.1f} tokens/s)")
    print(f"{'speed-up':>20}: {times[False] / times[True]:8.2f}x")
    same = outputs[True] == outputs[False]
    print(f"{'identical outputs':>20}: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
