"""The writer side of an asynchronous checkpoint (``CheckpointManager.save_async``): what
runs in the forked writer process, and what the parent keeps of a save in flight."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sci_scale.checkpoint.manifest import write_partial_manifest
from sci_scale.checkpoint.state import RunState


def drop_stale_write_results() -> None:
    """Empty megatron's write-results queue before a save.

    megatron's checkpoint writer (``filesystem_async``) passes each save's write results from
    the process that wrote the shards to the one that writes the metadata through one
    process-wide queue, and takes the first item it finds. A writer that died after reporting
    (an async save whose writer was killed, or a save that failed between writing and
    finalizing) leaves its item behind, and the next save of this process would describe
    that checkpoint's files in its metadata instead of its own. With one save in flight at a
    time, nothing in the queue belongs to the save about to start."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    pending = getattr(filesystem_async, "_results_queue", None)  # created by the first save
    while pending is not None:
        try:
            pending.get_nowait()
        except queue.Empty:
            break


@dataclass
class PendingSave:
    writer: Any  # multiprocessing.Process
    request: Any  # megatron's AsyncRequest
    tmp: Path
    final: Path
    run_state: RunState


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor in host memory (device tensors do not survive a fork)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_host(v) for v in obj)
    return obj


def write_in_background(
    write: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    rank_state: dict[str, Any],
    tmp: Path,
    rank: int,
) -> None:
    """The writer process of an async save: megatron's shard writer, this rank's state file,
    and the hashes of both for the manifest (so the seal has only the small files left)."""
    if write is not None:  # None: nothing of the model is this rank's to write (a DP replica)
        write(*args, **kwargs)
    rank_file = tmp / f"rank_{rank:05d}.pt"
    torch.save(rank_state, rank_file)  # synced by the hashing that follows
    mine = [rank_file, *(tmp / "model").glob(f"__{rank}_*")]
    write_partial_manifest(tmp, rank, mine)
