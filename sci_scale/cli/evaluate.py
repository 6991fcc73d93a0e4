"""``sci-scale eval``: held-out perplexity, SCAN / COGS exact match and the structural probe.

The suite (and torch with it) loads inside the handler, so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sci_scale.cli.common import add_trust_argument


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval", help="held-out perplexity, SCAN / COGS exact match, structural probe"
    )
    ev.add_argument("ckpt", help="checkpoint directory (e.g. RUN_DIR/checkpoints/step_0000300)")
    ev.add_argument(
        "--task",
        nargs="+",
        choices=["ppl", "scan", "cogs", "probe"],
        required=True,
        help="one or more: held-out perplexity, SCAN or COGS exact match, structural probe",
    )
    ev.add_argument("--split", default="length", help="SCAN split (length, simple, ...)")
    ev.add_argument("--part", choices=["train", "test"], default="test")
    ev.add_argument("--cogs-path", help="COGS TSV (e.g. the in-distribution test.tsv)")
    ev.add_argument(
        "--corpus", help="ppl: a JSONL file to score (default: the run's held-out corpus share)"
    )
    ev.add_argument(
        "--ppl-blocks",
        type=int,
        default=64,
        help="ppl: at most this many blocks (one pass at most)",
    )
    ev.add_argument("--probe-templates", type=int, default=128, help="probe: templates (x2)")
    ev.add_argument("--limit", type=int, help="evaluate the first N examples only")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument(
        "--max-new-tokens", type=int, help="default: the longest gold output's tokens + 2"
    )
    ev.add_argument("--json", help="write the figures to this JSON file")
    add_trust_argument(ev)
    ev.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from sci_scale.eval.suite import EvalPlan, evaluate_checkpoint_dir

    tasks = set(args.task)
    if "cogs" in tasks and not args.cogs_path:
        raise FileNotFoundError("--task cogs needs --cogs-path (a COGS TSV file)")
    ckpt = Path(args.ckpt)
    plan = EvalPlan(
        ppl_blocks=args.ppl_blocks if "ppl" in tasks else 0,
        scan_splits=[args.split] if "scan" in tasks else [],
        cogs_file=Path(args.cogs_path) if "cogs" in tasks else None,
        scan_part=args.part,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        probe_templates=args.probe_templates if "probe" in tasks else 0,
        progress=True,
    )
    figures = evaluate_checkpoint_dir(ckpt, plan, corpus=args.corpus)
    for key, value in figures.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
