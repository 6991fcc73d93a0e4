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
    add_generalization(exp_sub)


GENERALIZATION_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "generalization.yaml"


def add_generalization(exp_sub: argparse._SubParsersAction) -> None:
    gen = exp_sub.add_parser(
        "generalization",
        help="train each variant on each benchmark split's training part, select on dev, "
        "score the published test part; results.json, REPORT.md, plots",
    )
    add_config_arguments(
        gen,
        "train.steps=3000",
        config_help="YAML config of the study's runs (default: configs/generalization.yaml)",
    )
    gen.add_argument(
        "--preset",
        choices=["quick", "full"],
        help="quick (default): SCAN simple+length, vanilla vs SCI joint, 1 seed; full: 5 SCAN "
        "splits, 4 variants, 5 seeds",
    )
    gen.add_argument("--benchmark", choices=["scan", "cogs"], default="scan")
    gen.add_argument("--splits", help="comma-separated splits (a+b: a combined split)")
    gen.add_argument(
        "--variants", help="comma-separated: vanilla, pairs_no_scl, sci_joint, sci_pretrain_joint"
    )
    gen.add_argument("--seeds", type=int, help="number of seeds (1..N)")
    gen.add_argument("--out", help="study directory (default: the config's run.dir)")
    gen.add_argument("--run-index", type=int, help="only the K-th run of the plan (array task)")
    gen.add_argument("--list", action="store_true", help="print the plan (index, run) and exit")
    gen.add_argument(
        "--report-only", action="store_true", help="write results.json/REPORT.md, train nothing"
    )
    slurm = gen.add_argument_group("Slurm job array (--submit)")
    slurm.add_argument(
        "--submit", action="store_true", help="queue one array task per run + a report job"
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the scripts; queue nothing")
    slurm.add_argument("--time", default="04:00:00", help="time limit of one run")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per run (0: CPU nodes)")
    slurm.add_argument("--cpus-per-task", type=int, default=8)
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--max-parallel", type=int, help="array tasks running at once")
    add_trust_argument(gen)
    gen.set_defaults(handler=cmd_generalization)


def _submit_study(args: argparse.Namespace, cfg, study) -> int:
    from sci_scale.launch.inputs import resolve_paths
    from sci_scale.launch.study_array import ArrayOptions, submit_study

    opts = ArrayOptions(
        time=args.time, gpus=args.gpus, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, qos=args.qos,
        max_parallel=args.max_parallel,
    )  # fmt: skip
    study_args = [
        "--benchmark", study.benchmark, "--splits", ",".join(study.splits),
        "--variants", ",".join(v.key for v in study.variants),
        "--seeds", str(len(study.seeds)),
    ]  # fmt: skip
    out = study.out.resolve()
    cfg = resolve_paths(cfg, Path.cwd())
    result = submit_study(cfg, study_args, out, len(study.plan), opts, dry_run=args.dry_run)
    if args.dry_run:
        for name, script in result.scripts.items():
            print(f"# --- {name} ---\n{script}")
        return 0
    print(f"submitted array job {result.job_ids[0]} ({len(study.plan)} runs) and report job "
          f"{result.job_ids[1]}; results in {out}")  # fmt: skip
    return 0


def cmd_generalization(args: argparse.Namespace) -> int:
    from sci_scale.experiment.generalization import run_study
    from sci_scale.experiment.study import PRESETS, VARIANTS, Study, StudyError

    if args.config is None and GENERALIZATION_CONFIG.exists():
        args.config = str(GENERALIZATION_CONFIG)
    cfg = config_from_args(args)
    preset = PRESETS[args.preset or "quick"]
    splits = args.splits.split(",") if args.splits else list(preset.splits)
    if args.benchmark == "cogs" and not args.splits:
        splits = ["gen"]
    names = args.variants.split(",") if args.variants else list(preset.variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise StudyError(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    seeds = args.seeds if args.seeds is not None else preset.seeds
    if seeds < 1:
        raise StudyError(f"--seeds must be >= 1, got {seeds}")
    study = Study(
        cfg, Path(args.out or cfg.run.dir), args.benchmark, splits,
        [VARIANTS[n] for n in names], list(range(1, seeds + 1)),
    )  # fmt: skip
    if args.list:
        for i, spec in enumerate(study.plan):
            print(f"{i}\t{spec.name}")
        return 0
    if args.submit or args.dry_run:
        return _submit_study(args, cfg, study)
    command = " ".join(["sci-scale", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else ""
    report = run_study(study, args.run_index, args.report_only, command)
    print(f"report written to {report}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from sci_scale.experiment.ablation import run_ablation

    cfg = config_from_args(args)
    out = Path(args.out or cfg.run.dir)
    # The report quotes the command that made it, when there is one to quote.
    command = " ".join(["sci-scale", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else ""
    report = run_ablation(cfg, out, command, reevaluate=args.reevaluate)
    print(f"report written to {report}")
    return 0
