"""``sci-scale experiment``: studies made of several training runs, evaluated alike."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sci_scale.cli.common import add_config_arguments, add_trust_argument, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("experiment", help="studies made of several training runs")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True)
    abl = exp_sub.add_parser(
        "ablation",
        help="train vanilla / pairs / SCI joint / SCI frozen variants over seeds and pair "
        "rates, evaluate them alike, write REPORT.md with plots",
    )
    add_config_arguments(
        abl,
        "experiment.seeds=[1,2]",
        config_help="YAML config with an experiment section, e.g. configs/ablation.yaml",
        optional=False,
    )
    abl.add_argument("--out", help="study directory (default: the config's run.dir)")
    abl.add_argument(
        "--reevaluate",
        action="store_true",
        help="score finished runs' checkpoints again (new eval settings); retrains nothing",
    )
    add_trust_argument(abl)
    abl.set_defaults(handler=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    from sci_scale.experiment.ablation import run_ablation

    cfg = config_from_args(args)
    out = Path(args.out or cfg.run.dir)
    # The report quotes the command that made it, when there is one to quote.
    command = " ".join(["sci-scale", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else ""
    report = run_ablation(cfg, out, command, reevaluate=args.reevaluate)
    print(f"report written to {report}")
    return 0
