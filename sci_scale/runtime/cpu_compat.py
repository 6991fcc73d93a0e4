"""Lets megatron-core run on a CPU-only torch build (CI boxes, laptops).

megatron-core assumes CUDA in a handful of places. Each shim below bridges exactly one of them,
is applied only when CUDA is unavailable, and has its own test in ``tests/test_cpu_compat.py``:
when a megatron-core upgrade removes a need, that test fails and the shim can be deleted.

Shims (the five listed, in this order, in ``docs/architecture.md``, "CPU compatibility"):

1. ``rng_tracker``: megatron's model-parallel RNG tracker stores per-rank CUDA generator states
   and attention always forks it. On CPU it must fork the CPU generator instead.
2. ``current_device``: ``torch.cuda.current_device()`` is used as the allocation device of the
   global memory buffer, the tensor-parallel mappings and pipeline p2p; on CPU it is the CPU.
3. ``synchronize``: distributed checkpointing (and pipeline p2p) call
   ``torch.cuda.synchronize()`` after host copies; on CPU there is nothing to wait for.
4. ``cuda_literals``: modules that allocate with a literal ``device="cuda"`` get a torch proxy
   whose tensor factories map that device to the CPU (e.g. the schedules' token counter).
5. ``tensor_cuda``: ``Tensor.cuda()`` is the identity. megatron moves the tied output weight of
   the last pipeline stage with ``weight.data.cuda()`` before the all-reduce that copies the
   first stage's embedding into it; a method call cannot be redirected per module.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

_APPLIED: set[str] = set()

# Modules with a literal device="cuda" on a path sci-scale uses.
CUDA_LITERAL_MODULES: tuple[str, ...] = ("megatron.core.pipeline_parallel.schedules",)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like")


def needs_cpu_compat() -> bool:
    return not torch.cuda.is_available()


class _CPUDeviceTorch(ModuleType):
    """A stand-in for the ``torch`` module inside one megatron module: tensor factories asked
    for ``device="cuda"`` allocate on the CPU; everything else is torch itself."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
                device = kwargs.get("device")
                if device is not None and torch.device(device).type == "cuda":
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return factory
        return attr


def _shim_cuda_literals() -> None:
    proxy = _CPUDeviceTorch()
    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy  # type: ignore[attr-defined]


def _shim_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


def _shim_synchronize() -> None:
    torch.cuda.synchronize = lambda *_args, **_kwargs: None  # type: ignore[assignment]


def _shim_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *_args, **_kwargs: self  # type: ignore[method-assign]


def _cpu_get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _shim_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker with the CPU generator standing in for the CUDA one."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"rng seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker  # type: ignore[misc]
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


SHIMS = {
    "rng_tracker": _shim_rng_tracker,
    "current_device": _shim_current_device,
    "synchronize": _shim_synchronize,
    "cuda_literals": _shim_cuda_literals,
    "tensor_cuda": _shim_tensor_cuda,
}


def apply_cpu_compat(force: bool = False) -> list[str]:
    """Apply every shim once (only without CUDA unless ``force``); returns the names applied."""
    if not (force or needs_cpu_compat()):
        return []
    applied = []
    for name, shim in SHIMS.items():
        if name not in _APPLIED:
            shim()
            _APPLIED.add(name)
            applied.append(name)
    if applied:
        log.debug("megatron-core CPU compatibility shims applied: %s", ", ".join(applied))
    return applied
