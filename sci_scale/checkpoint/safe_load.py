"""Reading checkpoint files without running code from them.

A checkpoint is a directory someone may hand you, and every format in it is a pickle at
heart: torch's distributed checkpoint keeps its ``.metadata`` as a plain pickle (read with
``pickle.load``), DeepSpeed loads its ZeRO states with ``torch.load(weights_only=False)``, and
sci-scale's own ``run_state.pt`` / ``rank_*.pt`` are torch zip files. A crafted pickle runs
whatever it names while it is read. So every pickle a checkpoint holds is read here with an
allow-list:

- torch zip files (``run_state.pt``, ``rank_*.pt``, DeepSpeed's ``*_states.pt``) through
  ``torch.load(weights_only=True)``, torch's own restricted unpickler, with the few DeepSpeed
  classes its ZeRO states hold (a loss scaler, an enum, a fragment address) added for the
  duration of the read (:func:`safe_torch_load`);
- DCP ``.metadata`` through :class:`RestrictedUnpickler`, the standard library's documented way
  to restrict globals (``find_class``): it resolves only the dataclasses and enums of torch's
  checkpoint metadata, torch dtypes, layouts, memory formats and ``torch.Size``. torch's
  weights-only unpickler reads torch zip files only, and DCP offers no safe reader of its own,
  so :func:`restricted_checkpoint_reads` puts this unpickler in the place of the ``pickle``
  module that ``torch.distributed.checkpoint.filesystem`` reads metadata with, and hands
  DeepSpeed an engine whose ``load`` is :func:`safe_torch_load`, for the duration of a load.

Anything else is refused with a :class:`UnsafeCheckpointError` that names the file and the
global it asked for. ``--trust-checkpoint`` (``checkpoint.trust``) lifts the restriction for
checkpoints whose origin the user vouches for; it is never the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from sci_scale.checkpoint.index import CheckpointError
from sci_scale.checkpoint.trust import checkpoints_trusted

TRUST_HINT = "pass --trust-checkpoint only if you know who wrote it"

# Modules whose dataclasses and enums make up a DCP ``.metadata`` pickle.
DCP_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
# Plain functions and types that DCP metadata pickles reference and that construct nothing but
# values: layouts are pickled as ``torch.serialization._get_layout("torch.strided")``.
DCP_METADATA_GLOBALS = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): None,  # resolved lazily (a private torch helper)
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
# What DeepSpeed's ZeRO model and optimizer states hold beyond tensors and containers.
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to run or build something outside the allow-list."""


def _resolve(module: str, name: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _dcp_global(module: str, name: str) -> Any | None:
    """The object ``module.name`` if a DCP metadata pickle may use it, else None."""
    if (module, name) in DCP_METADATA_GLOBALS:
        return _resolve(module, name)
    if module == "torch" and "." not in name:
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            return value
        return None
    if module in DCP_METADATA_MODULES and "." not in name:
        value = getattr(importlib.import_module(module), name, None)
        is_record = isinstance(value, type) and (
            dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)
        )
        return value if is_record else None
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for DCP metadata: ``find_class`` resolves only :func:`_dcp_global`'s
    allow-list, so constructing a value is the most a pickle can make it do."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _dcp_global(module, name)
        except (ImportError, AttributeError):
            found = None
        if found is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to unpickle {module}.{name}, which checkpoint "
                f"metadata never holds (a tampered or foreign file; {TRUST_HINT})"
            )
        return found


def restricted_pickle_load(file: Any, source: str = "checkpoint metadata") -> Any:
    """``pickle.load`` through :class:`RestrictedUnpickler`; a malformed stream is a
    :class:`CheckpointError` naming ``source``."""
    try:
        return RestrictedUnpickler(file, source).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        reason = f"not a readable checkpoint metadata file ({exc})"
        raise CheckpointError(f"{source}: {reason}") from None


class _MetadataPickle:
    """Stands in for the ``pickle`` module inside ``torch.distributed.checkpoint.filesystem``:
    ``load`` is restricted (it names the file it reads), everything else is pickle's own.

    torch folds an exception raised while reading metadata into an ``AssertionError`` string
    inside a ``CheckpointException``; the refusal is kept here so that the caller can raise
    it as itself, one line naming the file."""

    def __init__(self) -> None:
        self.refusal: CheckpointError | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    def load(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        source = getattr(file, "name", None) or "checkpoint metadata"
        try:
            return restricted_pickle_load(file, str(source))
        except CheckpointError as exc:
            self.refusal = self.refusal or exc
            raise


def safe_torch_load(path: Path | str, map_location: Any = "cpu") -> Any:
    """``torch.load`` that cannot run code (torch's weights-only unpickler, plus DeepSpeed's
    state classes); a refused global or a corrupt file is one :class:`CheckpointError` line."""
    if checkpoints_trusted():
        return torch.load(path, map_location=map_location, weights_only=False)
    allowed = [_resolve(module, name) for module, name in _available(DEEPSPEED_GLOBALS)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle it: {why or 'unsupported content'} ({TRUST_HINT})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({reason})") from None


def _available(names: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """The (module, name) pairs that import here (DeepSpeed is optional)."""
    found = []
    for module, name in names:
        try:
            _resolve(module, name)
        except (ImportError, AttributeError):
            continue
        found.append((module, name))
    return found


class _SafeLoads:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`safe_torch_load`; everything
    else (saving, commits) is the wrapped engine's own."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)


@contextlib.contextmanager
def restricted_checkpoint_reads(deepspeed_engine: Any = None) -> Iterator[None]:
    """For the duration: DCP metadata is read by :class:`RestrictedUnpickler`, and
    ``deepspeed_engine`` (a DeepSpeedEngine, if given) loads its files with
    :func:`safe_torch_load`. Nothing changes when checkpoints are trusted."""
    if checkpoints_trusted():
        yield
        return
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    original_pickle = dcp_filesystem.pickle
    original_engine = getattr(deepspeed_engine, "checkpoint_engine", None)
    shim = _MetadataPickle()
    dcp_filesystem.pickle = shim  # type: ignore[assignment]
    if original_engine is not None:
        deepspeed_engine.checkpoint_engine = _SafeLoads(original_engine)
    try:
        yield
    except (CheckpointException, AssertionError, RuntimeError):
        if shim.refusal is None:
            raise
        raise shim.refusal from None
    finally:
        dcp_filesystem.pickle = original_pickle
        if original_engine is not None:
            deepspeed_engine.checkpoint_engine = original_engine
