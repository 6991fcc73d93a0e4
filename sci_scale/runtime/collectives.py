"""Every collective sci-scale itself calls, with each tensor on its group's device.

NCCL communicates CUDA tensors only and gloo CPU tensors only (except a group created with both,
``cpu:gloo,cuda:nccl``). A small Python value reduced across ranks (a stop flag, a token count,
a loss for the console) is the classic trap: ``torch.tensor(x)`` lands on the CPU, works on every
CPU test and raises on the first NCCL step. Here such values are built on the group's
communication device and read back as Python numbers, and tensors that already live somewhere
are moved there and back when needed. ``tests/test_collectives.py`` runs the parallel trainer
under :mod:`sci_scale.runtime.collective_check`, which rejects any tensor made without an
explicit device that reaches a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from sci_scale.runtime.device import current_device

ReduceOp = dist.ReduceOp


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors ``group``'s backend communicates."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        device = current_device()
        return device if device.type == "cuda" else torch.device("cuda", 0)
    return torch.device("cpu")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, op: Any = ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (moved to the group's device and back if needed)."""
    moved = _on(tensor, comm_device(group))
    dist.all_reduce(moved, op=op, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_values(
    values: Sequence[float | int | bool],
    group: dist.ProcessGroup | None = None,
    op: Any = ReduceOp.SUM,
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    """All-reduce a few Python numbers; every rank gets the reduced numbers back."""
    tensor = torch.tensor([float(v) for v in values], dtype=dtype, device=comm_device(group))
    dist.all_reduce(tensor, op=op, group=group)
    return [float(v) for v in tensor.tolist()]


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), on ``tensor``'s device."""
    moved = _on(tensor.contiguous(), comm_device(group))
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, moved, group=group)
    return [_on(p, tensor.device) for p in parts]


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable ``obj``. torch puts the bytes on the current CUDA device itself
    for NCCL groups (``torch.cuda.current_device()``, set at start by ``set_current_device``)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (placed as for ``all_gather_object``)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group`` (a no-op without a process group or with one rank).
    NCCL is told the device, so it never guesses one from the rank."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    device = comm_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
