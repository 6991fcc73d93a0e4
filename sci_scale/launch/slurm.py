"""``sci-scale submit``: render a Slurm batch script for a run and queue it with ``sbatch``.

The script comes from a Jinja template (``slurm/train.sbatch`` unless ``--template`` names a
site's own) filled from the submit options and the run configuration. Before anything is
queued the configuration is frozen into ``RUN_DIR/config.yaml`` (so a requeued job trains what
was submitted, whatever happens to the source YAML) and its parallel layout is checked against
nodes x tasks per node, with the same check and message the trainer uses at start-up, and
against the GPUs' memory with the planner of ``sci-scale plan`` (``launch.memory_plan``).

Every value taken from the config or the options reaches the script in one of two places, and
each has its own reader, so each has its own quoting:

- Shell lines (variable assignments, arrays, commands) are read by bash: values go through the
  template's ``q`` filter (``shlex.quote``), so a ``$(...)``, a backtick or a ``;`` in a run
  directory stays text. ``--launcher`` is split into words as a shell would split it (quotes
  group, nothing is expanded) and each word is quoted.
- ``#SBATCH`` lines are read by sbatch's own tokenizer, which splits on whitespace, honours
  double quotes and backslashes, and treats an unquoted ``#`` as a comment. Values go through
  ``sbatch_quote``, which double-quotes a value holding any of those and escapes backslashes,
  ``"`` and ``#`` inside (a form that older sbatch releases, which know no single quotes, read
  the same way).
  In ``--output``/``--error`` paths ``%`` is doubled, since sbatch expands ``%j``, ``%x``...;
  a path with a backslash is refused, because a backslash turns that expansion off.

Before anything is rendered, each value is checked (``script_values``); a failure is a
one-line :class:`ConfigError` naming the key, so ``sci-scale submit`` exits 2:

- No value may hold a control character (newline, carriage return, NUL, tab, ...) or a Unicode
  line or paragraph separator: sbatch stops reading directives at the first line that is not
  ``#SBATCH``, so a line break would end a directive and start a shell line that runs.
- ``#SBATCH`` values must have the form sbatch accepts: ``--time`` minutes, ``MM:SS``,
  ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS`` or ``UNLIMITED``; ``--mem`` an integer with
  an optional K/M/G/T suffix (``0``: all of a node's memory); ``--partition`` and ``--qos``
  comma-separated names, ``--account`` one name, names of letters, digits and ``_.+-``;
  ``--constraint`` feature names joined by ``& | , :`` with ``[ ] ( ) * !``; the job name
  (``--job-name``, default ``sci-<run.name>``) anything printable but ``/``, as it names the
  log files through ``%x``; counts are integers; extra ``--sbatch`` directives start with ``-``
  and are written as given (quote inside them for sbatch yourself).
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
from typing import Any

import jinja2

from sci_scale.config import Config, ConfigError, save_config
from sci_scale.config.layout import data_parallel_size
from sci_scale.errors import UserError
from sci_scale.launch.inputs import check_inputs, resolve_paths
from sci_scale.launch.memory_plan import DEFAULT_GPU_MEMORY, plan_memory, require_fit
from sci_scale.launch.script_quoting import (
    count,
    directive_value,
    optional_directive,
    refuse_control_characters,
    sbatch_quote,
    shell_name,
    srun_option,
)

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
    max_requeues: int | None = None  # None: slurm.max_restarts
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


def _job_name(cfg: Config, opts: SubmitOptions) -> str:
    """The job name; it names the log files (``%x`` in ``--output``), so it holds no ``/``."""
    key, name = ("--job-name", opts.job_name) if opts.job_name else ("run.name", cfg.run.name)
    refuse_control_characters(key, name)
    if not name or "/" in name:
        raise ConfigError(
            f"{key} {name!r}: the job name must be non-empty and hold no '/', since it names "
            "the job's log files (%x in --output)"
            + ("; pass --job-name" if key == "run.name" else "")
        )
    return opts.job_name or f"sci-{name}"


def _log_dir(run_dir: Path) -> str:
    """The run's Slurm log directory as an sbatch file name pattern (``%`` doubled)."""
    log_dir = str(run_dir / SLURM_DIR)
    if "\\" in log_dir:
        raise ConfigError(
            f"run.dir {str(run_dir)!r} contains a backslash, which turns off sbatch's %j/%x "
            "file name patterns in --output; choose a run directory without one"
        )
    return log_dir.replace("%", "%%")


def extra_directive(directive: str) -> str:
    """An extra ``--sbatch`` directive: one line, an option; written as given."""
    refuse_control_characters("--sbatch", directive)
    if not directive.startswith("-"):
        raise ConfigError(f"--sbatch {directive!r} is not an sbatch option (e.g. --mail-type=END)")
    return directive


def launcher_words(opts: SubmitOptions, container_image: str | None = None) -> list[str]:
    """The command the tasks run, as words: ``--launcher`` split as a shell splits it (quotes
    group, nothing is expanded), or this interpreter's (in a container, the image's) Python:
    on a shared filesystem the nodes run the same install."""
    if opts.launcher is None:
        python = "python" if (opts.container_image or container_image) else sys.executable
        return [python, "-m", "sci_scale"]
    refuse_control_characters("--launcher", opts.launcher)
    try:
        words = shlex.split(opts.launcher)
    except ValueError as exc:
        raise ConfigError(f"--launcher {opts.launcher!r}: {exc}") from None
    if not words:
        raise ConfigError("--launcher is empty: give the sci-scale command on the nodes")
    return words


def script_values(cfg: Config, config_path: Path, opts: SubmitOptions) -> dict[str, Any]:
    """The template's variables, each checked for where it lands (see the module docstring);
    a ConfigError names the first key that cannot be rendered safely."""
    run_dir = Path(refuse_control_characters("run.dir", cfg.run.dir)).resolve()
    refuse_control_characters("run.dir", str(run_dir))
    config = refuse_control_characters("config path", str(config_path.resolve()))
    log_dir = _log_dir(run_dir)
    sl = cfg.slurm
    image, mounts = opts.container_image, opts.container_mounts
    image_key, mounts_key = "--container-image", "--container-mounts"
    if image is None:
        image, image_key = sl.container, "slurm.container"
    if mounts is None:
        mounts, mounts_key = sl.container_mounts, "slurm.container_mounts"
    for key, value in ((image_key, image), (mounts_key, mounts)):
        if value is not None:
            refuse_control_characters(key, value)
    words = launcher_words(opts, image)
    requeues_key, requeues = "--max-requeues", opts.max_requeues
    if requeues is None:
        requeues_key, requeues = "slurm.max_restarts", sl.max_restarts
    nodes = count("--nodes", opts.nodes, 1)
    tasks = count("--tasks-per-node", opts.ranks_per_node, 1)
    gpus = count("--gpus-per-node", opts.gpus_per_node, 0)
    cpus = None if opts.cpus_per_task is None else count("--cpus-per-task", opts.cpus_per_task, 1)
    dp = opts.world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
    return {
        "job_name": _job_name(cfg, opts),
        "nodes": nodes,
        "tasks_per_node": tasks,
        "gpus_per_node": gpus,
        "cpus_per_task": cpus,
        # GPU nodes: all of a node's memory unless --mem says otherwise (sites often cap it)
        "mem": optional_directive("--mem", opts.mem if opts.mem or gpus == 0 else "0"),
        "time": directive_value("--time", opts.time),
        "partition": optional_directive("--partition", opts.partition),
        "account": optional_directive("--account", opts.account),
        "qos": optional_directive("--qos", opts.qos),
        "constraint": optional_directive("--constraint", opts.constraint),
        "exclusive": bool(opts.exclusive),
        "signal_seconds": count("--signal-seconds", opts.signal_seconds, 0),
        "max_requeues": count(requeues_key, requeues, 0),
        "setup": [
            refuse_control_characters(f"slurm.setup[{i}]", line) for i, line in enumerate(sl.setup)
        ],
        "env": [
            (
                shell_name(f"slurm.env.{name}", name),
                refuse_control_characters(f"slurm.env.{name}", value),
            )
            for name, value in sl.env.items()
        ],
        "container_image": image,
        "container_mounts": mounts or str(run_dir),
        "extra_sbatch": [extra_directive(directive) for directive in opts.extra_sbatch],
        "launcher_words": words,
        "srun_args": [srun_option(f"slurm.srun_args[{i}]", a) for i, a in enumerate(sl.srun_args)],
        "launcher": shlex.join(words),  # for site templates written as SCI_SCALE=({{ launcher }})
        "run_dir": str(run_dir),
        "log_dir": log_dir,
        "log_path": str(run_dir / SLURM_DIR),
        "output": f"{log_dir}/%x-%j.out",
        "error": f"{log_dir}/%x-%j.err",
        "config": config,
        "world_size": nodes * tasks,
        "layout": f"TP{cfg.parallel.tensor} x PP{cfg.parallel.pipeline} x DP{dp}",
    }


def render_script(cfg: Config, config_path: Path, opts: SubmitOptions) -> str:
    """The batch script for a run, from ``opts.template``.

    The template gets checked values (``script_values``) and two filters: ``q`` for anything in
    a shell line, ``sbatch_quote`` for anything in an #SBATCH line. ``log_dir`` is already an
    sbatch file name pattern (``%`` doubled) and ``launcher`` already shell-quoted words."""
    if not opts.template.is_file():
        raise ConfigError(f"Slurm template {opts.template} does not exist")
    values = script_values(cfg, config_path, opts)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(opts.template.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["sbatch_quote"] = sbatch_quote
    return env.get_template(opts.template.name).render(**values)


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


def submit(
    cfg: Config, opts: SubmitOptions, dry_run: bool = False, base: Path | None = None
) -> Submission:
    """Resolve the config's paths against ``base`` (default: the current directory), check the
    layout, its memory and the inputs, freeze the config beside the script, render the script,
    and (unless dry) sbatch it."""
    cfg = resolve_paths(cfg, base or Path.cwd())
    check_layout(cfg, opts)
    check_memory(cfg, opts)
    check_inputs(cfg)
    run_dir = Path(cfg.run.dir)
    slurm_dir = run_dir / SLURM_DIR
    stem = f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    # The job trains the config frozen beside its script; RUN_DIR/config.yaml is the latest.
    config_path = slurm_dir / f"{stem}.yaml"
    if dry_run:
        script = render_script(cfg, config_path, opts)
        return Submission(None, run_dir, slurm_dir / f"{stem}.sbatch", script)
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run sci-scale submit on a Slurm login node")
    script = render_script(cfg, config_path, opts)  # before any file: a refused value leaves none
    slurm_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create output directories
    for path in (config_path, run_dir / "config.yaml"):
        save_config(cfg, path)
    script_path = slurm_dir / f"{stem}.sbatch"
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
