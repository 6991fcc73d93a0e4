"""A CPU-side detector for the first GPU failure class: a default-device tensor in a collective.

On a GPU node, a tensor made without an explicit ``device`` lives on the CPU, and an NCCL
collective given it raises. On a CPU test every tensor is on the CPU, so nothing fails and the
bug ships. This checker makes the CPU run behave like the GPU one in that respect:

- a ``TorchFunctionMode`` marks the storage of every tensor a factory call (``torch.tensor``,
  ``zeros``, ``from_numpy``, ...) makes without an explicit device, remembering where;
- results computed only from marked tensors are marked too (``torch.tensor(x) * 2``);
- ``.to(device)`` / ``.cuda()`` of a marked tensor with an explicit device returns a fresh copy
  even when the tensor is already there, as moving a CPU tensor to a GPU would (unmarked
  tensors keep torch's semantics: ``.to`` of a tensor already in place returns it);
- the collectives of ``torch.distributed`` (all-reduce, all-gather, broadcast, send/recv,
  batched p2p, ...) raise :class:`CollectiveDeviceError` for a marked tensor, naming where it
  was made and where it was used.

It is switched on by ``SCI_SCALE_CHECK_COLLECTIVES=1`` (read when the process group is created),
so any run can be checked, and ``tests/test_collectives.py`` checks the parallel trainer with it.
Marks live in a weak dictionary keyed by the storage, so they vanish with the tensor's memory.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ENV_VAR = "SCI_SCALE_CHECK_COLLECTIVES"

_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.from_numpy, torch.scalar_tensor,
    torch.zeros, torch.ones, torch.empty, torch.full, torch.empty_strided,
    torch.arange, torch.linspace, torch.logspace, torch.eye,
    torch.rand, torch.randn, torch.randint, torch.randperm,
}  # fmt: skip
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "send", "recv", "isend", "irecv",
    "all_to_all", "all_to_all_single", "gather", "scatter", "batch_isend_irecv",
)  # fmt: skip
_SKIP_FRAMES = (os.sep + "torch" + os.sep, __file__)

_MARKS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_INSTALLED: dict[str, Any] = {}


class CollectiveDeviceError(RuntimeError):
    """A tensor that would sit on the CPU of a GPU node was handed to a collective."""


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and any(s in frame.f_code.co_filename for s in _SKIP_FRAMES):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse)
        return None


def made_at(t: torch.Tensor) -> str | None:
    """Where ``t``'s storage was made without an explicit device (None: not marked)."""
    storage = _storage(t)
    return None if storage is None else _MARKS.get(storage)


def _mark(t: Any, where: str) -> None:
    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
        storage = _storage(t)
        if storage is not None:
            _MARKS[storage] = where


def _tensors(args: Any, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _explicit_device(func: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("device") is not None:
        return True
    if func is torch.Tensor.cuda:
        return True
    # Tensor.to(device), Tensor.to(other), Tensor.to("cpu", dtype)
    return any(
        (isinstance(a, (torch.device, str, int)) and not isinstance(a, bool))
        or isinstance(a, torch.Tensor)
        for a in args[1:2]
    )


class DefaultDeviceTracker(TorchFunctionMode):
    """Marks tensors that land on the default device (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _MOVES and args and _explicit_device(func, args, kwargs):
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and made_at(out) is not None:
                # a default-device tensor "moved" to where it already is: on a GPU node it
                # would have been copied to the GPU, so the result is a fresh, placed tensor
                out = out.clone()
            return out
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            if kwargs.get("device") is None and torch.get_default_device().type == "cpu":
                _mark(out, _caller())
            return out
        inputs = _tensors(args, kwargs)
        if inputs and isinstance(out, torch.Tensor):
            origins = [made_at(t) for t in inputs]
            if all(origins) and _storage(out) is not None and made_at(out) is None:
                _mark(out, origins[0])  # type: ignore[arg-type]
        return out


def _check(name: str, args: tuple, kwargs: dict) -> None:
    candidates = _tensors(args, kwargs)
    for value in (*args, *kwargs.values()):  # batch_isend_irecv: a list of P2POp
        if isinstance(value, (list, tuple)):
            candidates += [op.tensor for op in value if isinstance(op, dist.P2POp)]
    for t in candidates:
        where = made_at(t)
        if where is not None:
            raise CollectiveDeviceError(
                f"torch.distributed.{name} at {_caller()} got a tensor made without an explicit "
                f"device at {where}: on a GPU node it would be a CPU tensor, which NCCL rejects; "
                "build it on the communication device (sci_scale.runtime.collectives)"
            )


def _wrap(name: str, original: Any) -> Any:
    @functools.wraps(original)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check(name, args, kwargs)
        return original(*args, **kwargs)

    checked.__sci_scale_checked__ = True  # type: ignore[attr-defined]
    return checked


def install() -> None:
    """Start marking default-device tensors and checking collectives in this process."""
    if _INSTALLED:
        return
    from torch.distributed import distributed_c10d

    for name in _COLLECTIVES:
        original = getattr(dist, name)
        _INSTALLED[name] = original
        checked = _wrap(name, original)
        setattr(dist, name, checked)
        if getattr(distributed_c10d, name, None) is original:
            setattr(distributed_c10d, name, checked)
    mode = DefaultDeviceTracker()
    mode.__enter__()
    _INSTALLED["__mode__"] = mode


def uninstall() -> None:
    if not _INSTALLED:
        return
    from torch.distributed import distributed_c10d

    mode = _INSTALLED.pop("__mode__")
    mode.__exit__(None, None, None)
    for name, original in _INSTALLED.items():
        setattr(dist, name, original)
        if getattr(getattr(distributed_c10d, name, None), "__sci_scale_checked__", False):
            setattr(distributed_c10d, name, original)
    _INSTALLED.clear()
    _MARKS.clear()


def install_from_env() -> bool:
    """Install when ``SCI_SCALE_CHECK_COLLECTIVES`` is set to 1 (idempotent)."""
    if os.environ.get(ENV_VAR, "") in ("1", "true", "yes"):
        install()
        return True
    return False
