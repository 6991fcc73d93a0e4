"""``sci-scale status RUN_DIR``: where a run stands, read from the files it writes.

Everything comes from the run directory (``config.yaml``, ``metrics.jsonl``, the ``latest``
checkpoint pointer, the job ids ``submit`` recorded) plus Slurm's view of the newest job, so it
works from a login node while the job runs, after it ended, and for runs never submitted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sci_scale.checkpoint.index import checkpoint_step, latest_checkpoint
from sci_scale.config.errors import ConfigError
from sci_scale.launch.slurm import job_ids, job_state
from sci_scale.train.metrics import METRICS_FILE


@dataclass
class RunStatus:
    run_dir: Path
    target_steps: int | None
    last_record: dict[str, Any] | None
    last_eval: dict[str, Any] | None
    tokens_per_s: float | None  # mean over the last few logged steps
    checkpoint: Path | None
    checkpoint_step: int | None
    jobs: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def step(self) -> int:
        logged = self.last_record["step"] if self.last_record else 0
        return max(logged, self.checkpoint_step or 0)

    @property
    def finished(self) -> bool:
        return self.target_steps is not None and self.step >= self.target_steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "target_steps": self.target_steps,
            "finished": self.finished,
            "lm_loss": self.last_record.get("lm_loss") if self.last_record else None,
            "scl_loss": self.last_record.get("scl_loss") if self.last_record else None,
            "eval_lm_loss": self.last_eval.get("eval_lm_loss") if self.last_eval else None,
            "tokens_per_s": self.tokens_per_s,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoint_step": self.checkpoint_step,
            "jobs": [{"id": j, "state": s} for j, s in self.jobs],
        }


def _read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl; a line cut short by a job killed mid-write is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_status(run_dir: str | Path, query_slurm: bool = True) -> RunStatus:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    config_path = run_dir / "config.yaml"
    target = None
    if config_path.exists():
        target = (yaml.safe_load(config_path.read_text()) or {}).get("train", {}).get("steps")
    records = _read_records(run_dir / METRICS_FILE)
    evals = [r for r in records if r.get("eval_lm_loss") is not None]
    recent = [r["tokens_per_s"] for r in records[-10:] if r.get("tokens_per_s")]
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    ids = job_ids(run_dir)
    jobs = [(ids[-1], job_state(ids[-1]) if query_slurm else None)] if ids else []
    return RunStatus(
        run_dir=run_dir,
        target_steps=target,
        last_record=records[-1] if records else None,
        last_eval=evals[-1] if evals else None,
        tokens_per_s=sum(recent) / len(recent) if recent else None,
        checkpoint=checkpoint,
        checkpoint_step=checkpoint_step(checkpoint) if checkpoint else None,
        jobs=jobs,
    )


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def format_status(status: RunStatus) -> str:
    rec, ev = status.last_record or {}, status.last_eval or {}
    target = status.target_steps if status.target_steps is not None else "?"
    state = "finished" if status.finished else "not finished"
    lines = [
        f"run        {status.run_dir}",
        f"step       {status.step}/{target} ({state})",
        f"lm loss    {_num(rec.get('lm_loss'), '.4f')} (step {rec.get('step', '-')})",
        f"scl loss   {_num(rec.get('scl_loss'), '.4f')}",
        f"eval lm    {_num(ev.get('eval_lm_loss'), '.4f')} (step {ev.get('step', '-')})",
        f"tokens/s   {_num(status.tokens_per_s, ',.0f')} (mean of the last 10 steps)",
        f"checkpoint {status.checkpoint or 'none'}",
    ]
    for job_id, job_state_ in status.jobs:
        lines.append(f"slurm job  {job_id}: {job_state_ or 'unknown to Slurm'}")
    return "\n".join(lines)
