"""How long a checkpoint stalls training, synchronous against asynchronous, in one run each.

Trains each config twice (``checkpoint.async_save`` false, then true) with a checkpoint every
``--interval`` steps and prints the training time each save took (``TrainResult.save_stalls_s``:
the time from the save's start until training resumes; for an async save, the plan, the
snapshot and the fork, while the writer process goes on). The interval leaves the writer time
to finish, as a real interval would; otherwise the next save waits for it.

    .venv/bin/python tools/bench_checkpoint.py               # tiny and a larger CPU config
    .venv/bin/python tools/bench_checkpoint.py --only larger --steps 9 --interval 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from sci_scale.config import load_config
from sci_scale.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    # configs/tiny.yaml: 4 layers, hidden 256 (the default job)
    "tiny": [],
    # 8 layers, hidden 1024: ~100M parameters, ~1.2 GB of weights and AdamW state per save
    "larger": [
        "model.num_layers=8",
        "model.hidden_size=1024",
        "model.num_attention_heads=16",
        "model.num_query_groups=4",
        "model.seq_length=128",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
    ],
}


def stalls(name: str, overrides: list[str], async_save: bool, args: argparse.Namespace) -> list:
    with tempfile.TemporaryDirectory(prefix=f"bench-ckpt-{name}-") as tmp:
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            [
                *overrides,
                f"run.dir={tmp}/run",
                f"data.cache_dir={args.cache}",
                f"train.steps={args.steps}",
                f"checkpoint.interval={args.interval}",
                "checkpoint.keep_last=1",
                f"checkpoint.async_save={str(async_save).lower()}",
                "train.eval_interval=100000",
                "logging.wandb_mode=disabled",
            ],
        )
        return train(cfg).save_stalls_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench-checkpoint-cache"))
    args = parser.parse_args()
    rows = []
    for name, overrides in CONFIGS.items():
        if args.only and name != args.only:
            continue
        sync = stalls(name, overrides, False, args)
        asyn = stalls(name, overrides, True, args)
        rows.append((name, statistics.median(sync), statistics.median(asyn), len(sync)))
    print(f"\n{'config':8} {'saves':>5} {'sync stall':>11} {'async stall':>12} {'async/sync':>10}")
    for name, sync_s, async_s, saves in rows:
        print(f"{name:8} {saves:5d} {sync_s:10.3f}s {async_s:11.3f}s {async_s / sync_s:10.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
