"""Which checkpoints a run directory holds, without importing torch or megatron.

The ``latest`` pointer and the ``step_NNNNNNN`` names are all that ``sci-scale status`` and job
scripts need, and they run on login nodes and between requeues where start-up time matters.
"""

from __future__ import annotations

from pathlib import Path

from sci_scale.errors import UserError

LATEST = "latest"
RUN_STATE = "run_state.pt"


class CheckpointError(UserError, RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was written at, from its name."""
    return int(path.name.removeprefix("step_"))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / RUN_STATE).exists():
        raise CheckpointError(f"{pointer} names {name!r}, which is missing or incomplete")
    return path
