"""Which checkpoints a run directory holds, without importing torch or megatron.

The ``latest`` pointer and the ``step_NNNNNNN`` names are all that ``sci-scale status`` and job
scripts need, and they run on login nodes and between requeues where start-up time matters.
"""

from __future__ import annotations

from pathlib import Path

from sci_scale.errors import UserError

LATEST = "latest"
RUN_STATE = "run_state.pt"
STEP_PREFIX = "step_"


class CheckpointError(UserError, RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was written at, from its name."""
    return int(path.name.removeprefix(STEP_PREFIX))


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


def step_checkpoints(root: Path) -> list[Path]:
    """Every ``step_NNNNNNN`` directory under ``root``, newest first. Half-written saves live
    in ``.tmp-step_*`` until sealed, so they are never among them."""
    found = []
    for path in root.glob(f"{STEP_PREFIX}*"):
        digits = path.name.removeprefix(STEP_PREFIX)
        if path.is_dir() and digits.isdigit():
            found.append((int(digits), path))
    return [path for _, path in sorted(found, reverse=True)]


def resume_candidates(root: Path) -> tuple[list[Path], str | None]:
    """The checkpoints a resume may start from, in the order to try them, and what is wrong
    with the ``latest`` pointer (None when it is absent or names an existing directory).

    The directory ``latest`` names comes first; then every other step directory, newest first,
    so that a damaged or dangling pointer falls back to the newest checkpoint that is still
    whole. Whether a candidate is whole is for the caller to check (against its manifest)."""
    steps = step_checkpoints(root)
    pointer = root / LATEST
    if not pointer.exists():
        return steps, None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return steps, f"{pointer} is unreadable ({exc})"
    named = root / name
    if not name or "/" in name or name in (".", "..") or not named.is_dir():
        return steps, f"{pointer} names {name!r}, which does not exist"
    return [named, *(p for p in steps if p != named)], None
