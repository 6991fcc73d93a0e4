"""A generalization study as a Slurm job array (``experiment generalization --submit``).

Each training run of the plan is one array task on one node (``--gpus`` GPUs, default 1: the
study's models are small), started as ``--run-index $SLURM_ARRAY_TASK_ID``; a report job with
``--dependency=afterany`` on the array gathers results.json and REPORT.md. The config is frozen
into ``OUT/slurm/study-<time>.yaml`` first, so every task trains what was submitted. Values
reach the script through the same checks and quoting as ``sci-scale submit``
(:mod:`sci_scale.launch.script_quoting`).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from sci_scale.config import Config, save_config
from sci_scale.launch.script_quoting import (
    count,
    directive_value,
    optional_directive,
    refuse_control_characters,
    sbatch_quote,
    shell_name,
)
from sci_scale.launch.slurm import TEMPLATE_DIR, SubmitError

STUDY_TEMPLATE = TEMPLATE_DIR / "study.sbatch"


@dataclass
class ArrayOptions:
    time: str = "04:00:00"  # per run
    gpus: int = 1
    cpus_per_task: int = 8
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    max_parallel: int | None = None  # array tasks running at once (None: Slurm's limit)


@dataclass
class StudySubmission:
    scripts: dict[str, str]  # name -> script text
    job_ids: list[str]  # empty for a dry run


def _render(values: dict) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(STUDY_TEMPLATE.parent)),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
        lstrip_blocks=True,
    )  # fmt: skip
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["sbatch_quote"] = sbatch_quote
    return env.get_template(STUDY_TEMPLATE.name).render(**values)


def study_scripts(
    cfg: Config, config_path: Path, study_args: list[str], out: Path, runs: int,
    opts: ArrayOptions,
) -> dict[str, str]:  # fmt: skip
    """The array script and the report script, every value checked for where it lands."""
    out = Path(refuse_control_characters("--out", str(out.resolve())))
    log_dir = str(out / "slurm").replace("%", "%%")
    args = [refuse_control_characters("study argument", a) for a in
            [str(config_path.resolve()), *study_args, "--out", str(out)]]  # fmt: skip
    parallel = (
        "" if opts.max_parallel is None else f"%{count('--max-parallel', opts.max_parallel, 1)}"
    )
    common = {
        "gpus": count("--gpus", opts.gpus, 0),
        "cpus": count("--cpus-per-task", opts.cpus_per_task, 1),
        "time": directive_value("--time", opts.time),
        "partition": optional_directive("--partition", opts.partition),
        "account": optional_directive("--account", opts.account),
        "qos": optional_directive("--qos", opts.qos),
        "setup": [
            refuse_control_characters(f"slurm.setup[{i}]", line)
            for i, line in enumerate(cfg.slurm.setup)
        ],
        "env": [
            (shell_name(f"slurm.env.{k}", k), refuse_control_characters(f"slurm.env.{k}", v))
            for k, v in cfg.slurm.env.items()
        ],
        "out": str(out),
        "launcher": shlex.join([sys.executable, "-m", "sci_scale"]),
        "study_args": args,
    }
    name = f"sci-study-{cfg.run.name}"
    return {
        "runs": _render(
            {
                **common,
                "job_name": name,
                "array": f"0-{runs - 1}{parallel}",
                "what": f"{runs} training runs",
                "output": f"{log_dir}/%x-%A_%a.out",
            }
        ),
        "report": _render(
            {
                **common,
                "job_name": f"{name}-report",
                "array": None,
                "gpus": 0,
                "what": "the report",
                "output": f"{log_dir}/%x-%j.out",
            }
        ),
    }


def _sbatch(*args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {args[-1]}: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout.strip().split(";")[0]


def submit_study(
    cfg: Config, study_args: list[str], out: Path, runs: int, opts: ArrayOptions,
    dry_run: bool = False,
) -> StudySubmission:  # fmt: skip
    slurm_dir = out / "slurm"
    stem = f"study-{time.strftime('%Y%m%d-%H%M%S')}"
    config_path = slurm_dir / f"{stem}.yaml"
    scripts = study_scripts(cfg, config_path, study_args, out, runs, opts)
    if dry_run:
        return StudySubmission(scripts, [])
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: submit the study from a Slurm login node")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_path)
    paths = {}
    for key, text in scripts.items():
        paths[key] = slurm_dir / f"{stem}-{key}.sbatch"
        paths[key].write_text(text)
    array_id = _sbatch(str(paths["runs"]))
    report_id = _sbatch(f"--dependency=afterany:{array_id}", str(paths["report"]))
    return StudySubmission(scripts, [array_id, report_id])
