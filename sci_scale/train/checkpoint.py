"""Atomic checkpoints: megatron distributed checkpointing for the model, plus per-rank state.

Layout under ``RUN_DIR/checkpoints``::

    step_0000100/
        model/                 megatron dist_checkpointing (reshardable to another TP/PP)
        rank_00000.pt          optimizer state and RNG states of global rank 0 (one per rank)
        run_state.pt           step, consumed samples, config, tokenizer identity
    latest                     text file naming the newest complete checkpoint

Every rank writes into ``.tmp-step_0000100``; only when all files are complete and synced does
rank 0 rename it to ``step_0000100`` and then replace ``latest`` (both ``os.replace``, atomic on
POSIX). A crash at any moment leaves ``latest`` naming a complete checkpoint. Loading uses
``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

log = logging.getLogger(__name__)

LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


@dataclass
class RunState:
    """What besides weights and optimizer state a run needs to continue exactly."""

    step: int
    consumed_samples: int
    config: dict[str, Any]
    tokenizer: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "config": self.config,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        return cls(data["step"], data["consumed_samples"], data["config"], data["tokenizer"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / "run_state.pt").exists():
        raise CheckpointError(f"{pointer} names {name!r}, which is missing or incomplete")
    return path


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        run_state: RunState,
    ) -> Path:
        name = step_dir_name(run_state.step)
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale)  # left by a save that crashed
            (tmp / "model").mkdir(parents=True)
        _barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
        _save_torch(
            {"optimizer": optimizer.state_dict(), "rng": capture_rng_state()},
            tmp / f"rank_{_rank():05d}.pt",
        )
        _barrier()
        if _rank() == 0:
            # run_state.pt is written last: its presence marks the directory complete.
            _save_torch(run_state.to_dict(), tmp / "run_state.pt")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(name + "\n")
            _fsync_file(pointer_tmp)
            os.replace(pointer_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old)

    @staticmethod
    def load(
        path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> RunState:
        """Load weights (any TP/PP layout) and, when given, this rank's optimizer and RNG."""
        state = torch.load(path / "run_state.pt", weights_only=True)
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {state.get('format_version')}, "
                f"this sci-scale reads {FORMAT_VERSION}"
            )
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(path / "model"))
        model.load_state_dict(loaded)
        if optimizer is not None:
            rank_file = path / f"rank_{_rank():05d}.pt"
            if not rank_file.exists():
                raise CheckpointError(
                    f"{rank_file} is missing: the checkpoint was written with a different "
                    "number of ranks; load the weights only (a new run) or use the saving layout"
                )
            rank_state = torch.load(rank_file, weights_only=True)
            optimizer.load_state_dict(rank_state["optimizer"])
            restore_rng_state(rank_state["rng"])
        return RunState.from_dict(state)
