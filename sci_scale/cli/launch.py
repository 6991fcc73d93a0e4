"""``sci-scale submit``, ``plan`` and ``status``: a run's life on a cluster, without training here.

None of them needs torch; ``status`` in particular is polled by job scripts and must stay quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sci_scale.cli.common import (
    DEFAULT_CONFIG,
    add_config_arguments,
    add_gpu_memory_argument,
    config_from_args,
)


def add_submit(sub: argparse._SubParsersAction) -> None:
    sbm = sub.add_parser(
        "submit", help="queue a training run on Slurm (renders slurm/train.sbatch)"
    )
    add_config_arguments(sbm, "train.steps=100")
    sbm.add_argument("--nodes", type=int, default=1)
    sbm.add_argument(
        "--gpus-per-node", type=int, default=8, help="one process per GPU; 0 for CPU nodes"
    )
    sbm.add_argument(
        "--tasks-per-node", type=int, help="processes per node (default: GPUs per node, or 1)"
    )
    sbm.add_argument("--cpus-per-task", type=int)
    sbm.add_argument("--mem", help="memory per node, e.g. 0 for all of it")
    sbm.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    sbm.add_argument("--partition")
    sbm.add_argument("--account")
    sbm.add_argument("--qos")
    sbm.add_argument("--constraint")
    sbm.add_argument("--job-name")
    sbm.add_argument("--no-exclusive", action="store_true", help="share nodes with other jobs")
    sbm.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="SIGUSR1 this many seconds before the time limit: checkpoint and requeue",
    )
    sbm.add_argument(
        "--max-requeues", type=int, help="restarts before giving up (default: slurm.max_restarts)"
    )
    sbm.add_argument(
        "--container-image", help="run the tasks in this image (pyxis; slurm.container)"
    )
    sbm.add_argument(
        "--container-mounts",
        help="pyxis mounts (default: slurm.container_mounts, else the run directory)",
    )
    sbm.add_argument("--launcher", help="the sci-scale command on the nodes")
    sbm.add_argument("--template", help="a batch script template (default: slurm/train.sbatch)")
    sbm.add_argument(
        "--sbatch", action="append", default=[], help="an extra #SBATCH directive (repeatable)"
    )
    sbm.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    add_gpu_memory_argument(sbm)
    sbm.set_defaults(handler=cmd_submit)


def add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="per-GPU memory of a config's layout; refuses one that does not fit"
    )
    add_config_arguments(plan, "parallel.tensor=4")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    add_gpu_memory_argument(plan)
    plan.add_argument("--json", help="write the plan to this JSON file")
    plan.set_defaults(handler=cmd_plan)


def add_status(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("status", help="a run's step, losses, throughput, checkpoint, Slurm job")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--finished",
        action="store_true",
        help="print nothing; exit 0 if train.steps is reached, 3 if not (for job scripts)",
    )
    st.set_defaults(handler=cmd_status)


def cmd_submit(args: argparse.Namespace) -> int:
    from sci_scale.launch.slurm import SubmitOptions, submit

    cfg = config_from_args(args)
    opts = SubmitOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        job_name=args.job_name,
        exclusive=not args.no_exclusive,
        signal_seconds=args.signal_seconds,
        max_requeues=args.max_requeues,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        launcher=args.launcher,
        extra_sbatch=list(args.sbatch),
        gpu_memory=args.gpu_memory,
        **({"template": Path(args.template)} if args.template else {}),
    )
    result = submit(cfg, opts, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(result.script)
        return 0
    print(f"submitted job {result.job_id}")
    print(f"run directory {result.run_dir}")
    print(f"script {result.script_path}; follow with: sci-scale status {result.run_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from sci_scale.launch.memory_plan import format_plan, plan_memory, require_fit

    cfg = config_from_args(args)
    world = args.nodes * args.gpus_per_node
    plan = plan_memory(cfg, world, args.gpu_memory)
    print(
        f"memory plan of {args.config or DEFAULT_CONFIG.name} on {args.nodes} "
        f"node(s) x {args.gpus_per_node} GPU(s) of {args.gpu_memory / 1e9:g} GB"
    )
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    require_fit(plan)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from sci_scale.launch.status import format_status, read_status

    status = read_status(args.run_dir, query_slurm=not args.finished)
    if args.finished:
        return 0 if status.finished else 3
    print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(status))
    return 0
