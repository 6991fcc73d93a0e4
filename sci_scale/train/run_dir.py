"""A run directory belongs to one run: a fresh ``train`` never writes over another run's
checkpoints or metrics.

Without ``--resume`` / ``--auto-resume``, a run directory that already holds checkpoints or
metric records is refused (one line naming what is there and the three ways on), because
starting there would truncate ``metrics.jsonl`` and interleave new checkpoints with a
``latest`` that still names the old run's. ``--overwrite`` says the old run may go: its
checkpoints and metrics are removed before the new run writes anything.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sci_scale.checkpoint.index import LATEST, step_checkpoints
from sci_scale.errors import UserError
from sci_scale.train.metrics import METRICS_FILE, SUPERSEDED_FILE

log = logging.getLogger("sci_scale.train")

CHECKPOINTS = "checkpoints"


class RunDirectoryInUse(UserError):
    """A fresh run was asked to start in a directory that holds another run."""


def previous_run(run_dir: Path) -> list[str]:
    """What of an earlier run ``run_dir`` holds (empty when nothing): for messages."""
    found = []
    root = run_dir / CHECKPOINTS
    steps = step_checkpoints(root) if root.is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint(s), the newest {steps[0].name}")
    elif (root / LATEST).exists():
        found.append(f"{root / LATEST}")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        with open(metrics, "rb") as handle:
            records = sum(1 for line in handle if line.strip())
        found.append(f"{METRICS_FILE} with {records} record(s)")
    return found


def claim_run_dir(run_dir: Path, resuming: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) a run directory holding another run before a
    fresh start. Every rank checks (a read of the shared file system, before any collective);
    only the main rank removes."""
    if resuming or (overwrite and not is_main):
        return
    found = previous_run(run_dir)
    if not found:
        return
    if not overwrite:
        raise RunDirectoryInUse(
            f"run.dir={run_dir} already holds a run ({', '.join(found)}): continue it with "
            "--resume or --auto-resume, start a new one with another run.dir, or replace it "
            "with --overwrite"
        )
    if is_main:
        log.warning("--overwrite: removing the previous run in %s (%s)", run_dir, ", ".join(found))
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        for name in (METRICS_FILE, SUPERSEDED_FILE):
            (run_dir / name).unlink(missing_ok=True)
