"""Where metrics go: ``RUN_DIR/metrics.jsonl`` (always), the console, and wandb.

wandb runs offline unless ``logging.wandb_mode`` says otherwise, writes under the run directory,
and receives only the config and the metrics (never the environment, so no secrets).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads as "not computed on this step"
    return value


SUPERSEDED_FILE = "metrics.superseded.jsonl"


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a kill mid-write has none and counts as past
    every step (it is set aside with the interrupted attempt's other records)."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def set_aside_records_after(path: Path, after_step: int) -> int:
    """Move the records past ``after_step`` out of ``path`` into ``metrics.superseded.jsonl``
    beside it; returns how many moved.

    A resume repeats the steps after its checkpoint (with the same losses when nothing was
    damaged), so ``metrics.jsonl`` keeps one record per step and reads as one run; the records
    the interrupted attempt wrote for those steps are kept, not deleted, in the side file. The
    side file is appended to first, so a crash in between duplicates a record, never loses one.
    """
    if not path.exists():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            (kept if _step_of(line) <= after_step else moved).append(line)
    if not moved:
        return 0
    with open(path.with_name(SUPERSEDED_FILE), "a") as side:
        side.write("".join(line + "\n" for line in moved))
        side.flush()
        os.fsync(side.fileno())
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    log.info(
        "%d record(s) past step %d, from the interrupted attempt, moved to %s",
        *(len(moved), after_step, path.with_name(SUPERSEDED_FILE)),
    )
    return len(moved)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsSink:
    """Appends one JSON object per step; mirrors it to wandb when enabled."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        wandb_mode: str,
        project: str,
        run_name: str,
        resume_step: int = 0,
    ) -> None:
        self.path = run_dir / METRICS_FILE
        set_aside_records_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        self._wandb = None
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, config, wandb_mode, project, run_name)

    def write(self, record: dict[str, Any], prefix: str = "") -> None:
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            step = clean.get("step")
            payload = {f"{prefix}{k}": v for k, v in clean.items() if k != "step" and v is not None}
            self._wandb.log(payload, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, config: dict[str, Any], mode: str, project: str, name: str):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: metrics go to %s only", run_dir / METRICS_FILE)
        return None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    try:
        return wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
    except Exception as exc:  # wandb problems must never stop training
        log.warning(
            "wandb could not start (%s): metrics go to %s only", exc, run_dir / METRICS_FILE
        )
        return None
