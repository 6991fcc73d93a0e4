"""Activation memory of a forward, measured exactly: the bytes of the distinct storages autograd
saves for the backward (what training keeps alive per micro-batch), free of allocator noise."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_for_backward(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps while ``forward()`` runs, storages of ``exclude`` (weights) left out."""
    skipped = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skipped:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())
