"""``sci-scale train`` and ``sci-scale bench``: the commands that run training steps here.

torch and megatron load inside the handlers, so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sci_scale.cli.common import add_config_arguments, add_trust_argument, config_from_args


def add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model (default config: configs/tiny.yaml)")
    add_config_arguments(train, "train.steps=100")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue from run.dir's latest checkpoint"
    )
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the latest checkpoint if there is one, else start (for jobs)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a run.dir that already holds checkpoints or metrics, "
        "replacing them",
    )
    add_trust_argument(train)
    train.set_defaults(handler=cmd_train)


def add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="tokens/s of a config and the step-time cost of its SCI branch"
    )
    add_config_arguments(bench, "model.seq_length=512")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    bench.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain transformers Llama step of the same shape (default: yes)",
    )
    bench.add_argument("--json", help="write every figure to this JSON file")
    bench.add_argument("--markdown", help="write the figures as a markdown table to this file")
    bench.set_defaults(handler=cmd_bench)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from sci_scale.train.trainer import train

    resume = "auto" if args.auto_resume else args.resume
    result = train(cfg, resume=resume, overwrite=args.overwrite)
    if result.history:
        first, last = result.history[0], result.history[-1]
        logging.getLogger("sci_scale").info(
            "lm_loss %.4f -> %.4f over steps %d..%d; metrics in %s",
            first["lm_loss"],
            last["lm_loss"],
            first["step"],
            last["step"],
            result.run_dir / "metrics.jsonl",
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sci_scale.train.bench import bench, report

    cfg = config_from_args(args)
    results = bench(cfg, steps=args.steps, warmup=args.warmup, baseline=args.baseline)
    print(report(results))
    if args.json:
        import json

        from sci_scale.train.bench import summary

        Path(args.json).write_text(json.dumps(summary(results), indent=2) + "\n")
        print(f"figures written to {args.json}")
    if args.markdown:
        from sci_scale.train.bench import markdown_table, summary

        Path(args.markdown).write_text(markdown_table(summary(results)))
        print(f"markdown table written to {args.markdown}")
    return 0
