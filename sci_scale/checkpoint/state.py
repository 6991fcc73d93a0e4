"""The run state a checkpoint carries beside its tensors, and reading it back.

Kept apart from the writers so that tools which only need to know what a checkpoint is (its
config, its tokenizer, the step it was saved at) never import megatron's checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sci_scale.checkpoint.index import RUN_STATE, CheckpointError
from sci_scale.checkpoint.safe_load import safe_torch_load

FORMAT_VERSION = 1


@dataclass
class RunState:
    """What besides weights and optimizer state a run needs to continue exactly."""

    step: int
    consumed_samples: int
    world_size: int
    config: dict[str, Any]
    tokenizer: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "world_size": self.world_size,
            "config": self.config,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        return cls(
            data["step"],
            data["consumed_samples"],
            data["world_size"],
            data["config"],
            data["tokenizer"],
        )


def read_run_state(path: Path) -> RunState:
    """The run state of a complete checkpoint; a clear error for anything else, and never
    unpickling code (``safe_load``)."""
    if not (path / RUN_STATE).exists():
        raise CheckpointError(f"{path} is not a sci-scale checkpoint (no {RUN_STATE})")
    state = safe_torch_load(path / RUN_STATE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / RUN_STATE}: not a sci-scale run state")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format_version')}, "
            f"this sci-scale reads {FORMAT_VERSION}"
        )
    try:
        return RunState.from_dict(state)
    except KeyError as exc:
        missing = f"no {exc} field; not a complete run state"
        raise CheckpointError(f"{path / RUN_STATE}: {missing}") from None
