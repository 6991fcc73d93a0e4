"""``sci-scale submit``: render a Slurm batch script for a run and queue it with ``sbatch``.

The script comes from a Jinja template (``slurm/train.sbatch`` unless ``--template`` names a
site's own) filled from the submit options and the run configuration. Before anything is
queued the configuration is frozen into ``RUN_DIR/config.yaml`` (so a requeued job trains what
was submitted, whatever happens to the source YAML) and its parallel layout is checked against
nodes x tasks per node, with the same check and message the trainer uses at start-up, and
against the GPUs' memory with the planner of ``sci-scale plan`` (``launch.memory_plan``).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from sci_scale.config import Config, ConfigError, config_to_dict
from sci_scale.config.layout import data_parallel_size
from sci_scale.errors import UserError
from sci_scale.launch.memory_plan import DEFAULT_GPU_MEMORY, plan_memory, require_fit

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
TRAIN_TEMPLATE = TEMPLATE_DIR / "train.sbatch"
SLURM_DIR = "slurm"  # under the run directory: rendered scripts, job ids, job output
JOB_IDS_FILE = "job_ids"


class SubmitError(UserError, RuntimeError):
    """sbatch is missing or refused the job."""


@dataclass
class SubmitOptions:
    """What ``sci-scale submit`` asks of Slurm (the training itself comes from the config)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU (one per node on CPU clusters)
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "0" for all of a node's memory
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    exclusive: bool = True
    signal_seconds: int = 120  # USR1 this long before the time limit: checkpoint, requeue
    max_requeues: int = 20
    container_image: str | None = None
    container_mounts: str | None = None
    launcher: str | None = None  # the sci-scale command on the nodes; default: this Python
    extra_sbatch: list[str] = field(default_factory=list)
    template: Path = TRAIN_TEMPLATE
    gpu_memory: int = DEFAULT_GPU_MEMORY  # bytes per GPU, for the memory plan

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def check_layout(cfg: Config, opts: SubmitOptions) -> int:
    """The data-parallel size on ``opts``' nodes, or a ConfigError before anything is queued."""
    for name, value in (("--nodes", opts.nodes), ("tasks per node", opts.ranks_per_node)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if opts.gpus_per_node > 0 and opts.ranks_per_node != opts.gpus_per_node:
        raise ConfigError(
            f"--tasks-per-node ({opts.ranks_per_node}) must equal --gpus-per-node "
            f"({opts.gpus_per_node}): sci-scale runs one process per GPU"
        )
    world = (
        f"--nodes ({opts.nodes}) x {'--gpus-per-node' if opts.gpus_per_node else 'tasks per node'} "
        f"({opts.ranks_per_node}) = {opts.world_size} processes"
    )
    dp = data_parallel_size(cfg, opts.world_size, world)
    if cfg.parallel.tensor > opts.ranks_per_node:
        log.warning(
            "parallel.tensor=%d spans nodes (%d processes per node): tensor-parallel "
            "all-reduces will cross the network",
            cfg.parallel.tensor,
            opts.ranks_per_node,
        )
    return dp


def default_launcher() -> str:
    """This interpreter's sci-scale: on a shared filesystem the nodes run the same install."""
    return f"{shlex.quote(sys.executable)} -m sci_scale"


def render_script(cfg: Config, config_path: Path, opts: SubmitOptions) -> str:
    """The batch script for a run, from ``opts.template``."""
    run_dir = Path(cfg.run.dir).resolve()
    if not opts.template.is_file():
        raise ConfigError(f"Slurm template {opts.template} does not exist")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(opts.template.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    launcher = opts.launcher or ("python -m sci_scale" if opts.container_image else None)
    return env.get_template(opts.template.name).render(
        job_name=opts.job_name or f"sci-{cfg.run.name}",
        nodes=opts.nodes,
        tasks_per_node=opts.ranks_per_node,
        gpus_per_node=opts.gpus_per_node,
        cpus_per_task=opts.cpus_per_task,
        mem=opts.mem,
        time=opts.time,
        partition=opts.partition,
        account=opts.account,
        qos=opts.qos,
        constraint=opts.constraint,
        exclusive=opts.exclusive,
        signal_seconds=opts.signal_seconds,
        max_requeues=opts.max_requeues,
        container_image=opts.container_image,
        container_mounts=opts.container_mounts or str(run_dir),
        extra_sbatch=opts.extra_sbatch,
        launcher=launcher or default_launcher(),
        run_dir=str(run_dir),
        log_dir=str(run_dir / SLURM_DIR),
        config=str(config_path.resolve()),
        world_size=opts.world_size,
        layout=(
            f"TP{cfg.parallel.tensor} x PP{cfg.parallel.pipeline} x "
            f"DP{opts.world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)}"
        ),
    )


@dataclass
class Submission:
    job_id: str | None  # None for a dry run
    run_dir: Path
    script_path: Path
    script: str


def check_memory(cfg: Config, opts: SubmitOptions) -> None:
    """Refuse a layout whose planned memory exceeds the GPUs' (CPU nodes are not planned)."""
    if opts.gpus_per_node > 0:
        require_fit(plan_memory(cfg, opts.world_size, opts.gpu_memory))


def submit(cfg: Config, opts: SubmitOptions, dry_run: bool = False) -> Submission:
    """Check the layout and its memory, freeze the config, render the script, and (unless dry)
    sbatch it."""
    check_layout(cfg, opts)
    check_memory(cfg, opts)
    run_dir = Path(cfg.run.dir).resolve()
    slurm_dir = run_dir / SLURM_DIR
    config_path = run_dir / "config.yaml"
    if dry_run:
        script = render_script(cfg, config_path, opts)
        return Submission(None, run_dir, slurm_dir / "train.sbatch", script)
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run sci-scale submit on a Slurm login node")
    slurm_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create output directories
    with open(config_path, "w") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)
    script = render_script(cfg, config_path, opts)
    script_path = slurm_dir / f"train-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script_path.write_text(script)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, cwd=run_dir
    )
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script_path}: {proc.stderr.strip() or proc.stdout}")
    job_id = proc.stdout.strip().split(";")[0]  # "--parsable" prints "id[;cluster]"
    with open(slurm_dir / JOB_IDS_FILE, "a") as handle:
        handle.write(job_id + "\n")
    return Submission(job_id, run_dir, script_path, script)


def job_ids(run_dir: Path) -> list[str]:
    """Jobs submitted for a run, oldest first."""
    path = run_dir / SLURM_DIR / JOB_IDS_FILE
    return path.read_text().split() if path.exists() else []


def job_state(job_id: str) -> str | None:
    """Slurm's state of a job (PENDING, RUNNING, COMPLETED, ...), or None if Slurm cannot say."""
    if shutil.which("scontrol") is not None:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
        )
        for item in proc.stdout.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
    if shutil.which("sacct") is not None:  # finished jobs, once scontrol has forgotten them
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True
        )
        states = proc.stdout.split()
        if proc.returncode == 0 and states:
            return states[-1]
    return None
