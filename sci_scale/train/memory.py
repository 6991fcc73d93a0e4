"""What one rank holds for training: parameters, gradients and optimizer state, in bytes.

Counted from the tensors themselves (each storage once), so the figures show what ZeRO
partitions: stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the parameters.
DeepSpeed keeps its partitions in attributes of its ZeRO optimizer; the names read here are
those of DeepSpeed 0.19 (a missing one counts as zero, never as an error).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger("sci_scale.train")


def _bytes(tensors: Iterable[Any], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, engine: Any) -> dict:
    """{"params", "grads", "optimizer"} bytes held by this rank right now (None: unknown)."""
    seen: set[int] = set()
    params = [getattr(p, "ds_tensor", p.data) for p in model.parameters()]
    out = {"params": _bytes(params, seen)}
    grads = [p.grad for p in model.parameters()]
    inner = optimizer
    masters: list[Any] = []
    if engine is not None:
        zero = engine.optimizer
        inner = getattr(zero, "optimizer", zero)
        grads += _flatten(getattr(zero, "averaged_gradients", {}))
        grads += [getattr(zero, "grad_partitions_flat_buffer", None)]  # ZeRO-3
        grads += [getattr(zero, "grads_in_partition", None)]  # ZeRO-2, contiguous gradients
        grads += _flatten(getattr(zero, "ipg_buffer", None) or [])
        masters = _flatten(getattr(zero, "single_partition_of_fp32_groups", []))
        masters += _flatten(getattr(zero, "fp32_partitioned_groups_flat", []))
        grads += [getattr(m, "grad", None) for m in masters]
    out["grads"] = _bytes(grads, seen)
    if (
        engine is not None
        and out["grads"] == 0
        and any(p.requires_grad for p in model.parameters())
    ):
        # ZeRO-2 with caller-owned accumulation keeps its gradient partitions in buffers this
        # accounting does not find: report "unknown" rather than a false zero.
        out["grads"] = None
    out["optimizer"] = _bytes(masters + _flatten(list(inner.state.values())), seen)
    return out


class FirstStepMemory:
    """What a rank holds at the first optimizer step, measured once.

    Gradients are at their peak right before the update and the optimizer state exists right
    after it, so the two halves are read on either side of the first step; later steps hold the
    same. The figures are logged and become ``mem_*_mb`` fields of the first step's record."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.figures: dict[str, int | None] | None = None
        self._grads: int | None = None

    @property
    def pending(self) -> bool:
        return self.figures is None

    def before_update(self, model: torch.nn.Module, optimizer: Any, engine: Any) -> None:
        if self.pending:
            self._grads = state_bytes(model, optimizer, engine)["grads"]

    def after_update(self, model: torch.nn.Module, optimizer: Any, engine: Any) -> None:
        if not self.pending:
            return
        after = state_bytes(model, optimizer, engine)
        self.figures = {
            "params": after["params"],
            "grads": self._grads,
            "optimizer": after["optimizer"],
        }
        log.info(
            "memory of rank %d: parameters %s, gradients %s, optimizer state %s",
            self.rank,
            *(_megabytes(self.figures[k]) for k in ("params", "grads", "optimizer")),
        )

    def record_fields(self) -> dict[str, float | None]:
        assert self.figures is not None, "measured at the first step"
        return {f"mem_{k}_mb": None if v is None else v / 2**20 for k, v in self.figures.items()}


def _megabytes(value: int | None) -> str:
    return "not measured" if value is None else f"{value / 2**20:.2f} MB"
