"""Atomic checkpoints: megatron distributed checkpointing for the model, plus per-rank state.

Layout under ``RUN_DIR/checkpoints``::

    step_0000100/
        model/                 megatron dist_checkpointing (reshardable to another TP/PP)
        rank_00000.pt          RNG states (and, without DeepSpeed, optimizer state) of rank 0
        deepspeed/             ZeRO-partitioned optimizer state (DeepSpeed's format), if used
        run_state.pt           step, consumed samples, config, tokenizer identity
        manifest.json          size and xxh3-128 hash of every file above (checkpoint.manifest)
    latest                     text file naming the newest complete checkpoint

Every rank writes into ``.tmp-step_0000100``; only when all files are complete, hashed into the
manifest and synced does rank 0 rename it to ``step_0000100`` and then replace ``latest`` (both
``os.replace``, atomic on POSIX). A crash at any moment leaves ``latest`` naming a complete
checkpoint. Every pickle a checkpoint holds is read through ``checkpoint.safe_load`` (an
allow-list of the classes each format needs): loading a checkpoint does not run code from it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from sci_scale.checkpoint import async_writer
from sci_scale.checkpoint.index import LATEST, RUN_STATE, CheckpointError, step_dir_name
from sci_scale.checkpoint.manifest import fsync_dir, write_manifest
from sci_scale.checkpoint.safe_load import restricted_checkpoint_reads, safe_torch_load
from sci_scale.checkpoint.state import RunState, read_run_state
from sci_scale.runtime import collectives
from sci_scale.runtime.signals import deferred

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "zero"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    collectives.barrier()


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


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last
        self.pending: async_writer.PendingSave | None = None  # an async save being written

    @deferred()  # helper processes of the save must not die of a job-wide signal
    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        run_state: RunState,
        engine: Any = None,
    ) -> Path:
        """Write a complete checkpoint (collective: every rank calls it)."""
        self.poll(blocking=True)
        tmp, final = self._start(run_state)
        with full_parameters(engine, model):
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
        rank_state = self._rank_state(tmp, optimizer, engine)
        _save_torch(rank_state, tmp / f"rank_{_rank():05d}.pt")
        _barrier()
        self._finish(tmp, final, run_state)
        return final

    @deferred()  # the writer process inherits the block: a job-wide signal cannot kill it
    def save_async(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        run_state: RunState,
        engine: Any = None,
    ) -> Path:
        """Start a checkpoint and return while a forked process writes it (collective).

        What stalls training is megatron's save plan (collective), ``common.pt``, copying this
        rank's tensors off the device and the fork; the writer process then writes the shards
        and this rank's RNG/optimizer file from that snapshot (the fork's copy-on-write memory)
        and hashes what it wrote. :meth:`poll` finishes the checkpoint once every rank's writer
        is done: megatron's metadata, the manifest, the rename, ``latest``. Until then the
        checkpoint is a ``.tmp-`` directory and ``latest`` names the previous one. One save is
        in flight at a time: a second waits for the first. DeepSpeed's ZeRO state is written
        synchronously before the fork (its engine owns that format)."""
        self.poll(blocking=True)
        tmp, final = self._start(run_state)
        with full_parameters(engine, model):
            request = dist_checkpointing.save(
                model.sharded_state_dict(), str(tmp / "model"), async_sharded_save=True
            )
        rank_state = async_writer.to_host(self._rank_state(tmp, optimizer, engine))
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[1] = request.preload_fn()  # device tensors staged in host memory
        writer = multiprocessing.get_context("fork").Process(
            target=async_writer.write_in_background,
            args=(request.async_fn, args, request.async_fn_kwargs, rank_state, tmp, _rank()),
        )
        writer.start()
        self.pending = async_writer.PendingSave(writer, request, tmp, final, run_state)
        return final

    def poll(self, blocking: bool = False) -> Path | None:
        """Finish the checkpoint in flight if every rank's writer is done (or, ``blocking``,
        once they are); returns its path when it was finished now. Collective: every rank calls
        it at the same points (the trainer: once per step, before a save, at the end)."""
        pending = self.pending
        if pending is None:
            return None
        if blocking:
            pending.writer.join()
        (alive,) = collectives.all_reduce_values(
            [pending.writer.is_alive()], op=collectives.ReduceOp.MAX
        )
        if alive:
            return None
        pending.writer.join()
        self.pending = None
        code = pending.writer.exitcode
        codes = collectives.all_gather_object(code) if dist.is_initialized() else [code]
        failed = {rank: code for rank, code in enumerate(codes) if code != 0}
        if failed:
            where = ", ".join(f"rank {r}: status {c}" for r, c in sorted(failed.items()))
            raise CheckpointError(
                f"the checkpoint of step {pending.run_state.step} was not written (its writer "
                f"process exited with {where}); {pending.tmp} is incomplete and "
                f"{self.root / LATEST} still names the previous checkpoint"
            )
        for finalize in pending.request.finalize_fns:  # megatron's metadata
            finalize()
        self._finish(pending.tmp, pending.final, pending.run_state)
        if _rank() == 0:
            log.info("checkpoint %s complete", pending.final)
        return pending.final

    def _start(self, run_state: RunState) -> tuple[Path, Path]:
        async_writer.drop_stale_write_results()
        name = step_dir_name(run_state.step)
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale)  # left by a save that crashed
            (tmp / "model").mkdir(parents=True)
        _barrier()
        return tmp, final

    @staticmethod
    def _rank_state(tmp: Path, optimizer: torch.optim.Optimizer, engine: Any) -> dict[str, Any]:
        rank_state: dict[str, Any] = {"rng": capture_rng_state()}
        if engine is None:
            rank_state["optimizer"] = optimizer.state_dict()
        else:  # ZeRO-partitioned optimizer state, in DeepSpeed's own format
            with _weights_kept_once(engine):
                engine.save_checkpoint(
                    str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False
                )
        return rank_state

    def _finish(self, tmp: Path, final: Path, run_state: RunState) -> None:
        """Seal the checkpoint, then point ``latest`` at it and prune old ones."""
        _seal(tmp, final, run_state)
        if _rank() == 0:
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            _fsync_file(pointer_tmp)
            os.replace(pointer_tmp, self.root / LATEST)
            fsync_dir(self.root)
            self._prune(keep=final)
        _barrier()

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old)


# Parts of a model a checkpoint may lack: a backbone imported from Hugging Face (or trained with
# sci.mode=off) starts a run with an SCI branch, which then keeps its fresh initialisation.
OPTIONAL_PREFIXES = ("sci.", "temperature.")


def _without_prefixes(sharded: Any, prefixes: tuple[str, ...]) -> Any:
    """A sharded state dict without the leaves whose checkpoint key starts with a prefix."""
    if isinstance(sharded, dict):
        kept = {k: _without_prefixes(v, prefixes) for k, v in sharded.items()}
        return {k: v for k, v in kept.items() if v is not _DROPPED}
    key = getattr(sharded, "key", None)
    if isinstance(key, str) and key.startswith(prefixes):
        return _DROPPED
    return sharded


_DROPPED = object()


def load_weights(path: Path, model: torch.nn.Module, allow_missing_sci: bool = False) -> RunState:
    """Model weights from a checkpoint saved at any TP/PP layout (megatron reshards them).

    ``allow_missing_sci``: a checkpoint without an SCI branch (an imported backbone) loads into
    a model with one; the branch keeps its initialisation. Anything else missing is an error.
    Call before the model is handed to DeepSpeed: ZeRO-3 partitions what it is given."""
    state = read_run_state(path)
    sharded = model.sharded_state_dict()
    strict = True
    if allow_missing_sci:
        with restricted_checkpoint_reads():
            saved = dist_checkpointing.load_tensors_metadata(str(path / "model"))
        missing = tuple(p for p in OPTIONAL_PREFIXES if not any(k.startswith(p) for k in saved))
        if missing:
            sharded = _without_prefixes(sharded, missing)
            strict = False
            log.info("%s has no %s weights: they keep their initialisation", path, missing)
    with restricted_checkpoint_reads():
        loaded = dist_checkpointing.load(sharded, str(path / "model"))
    result = model.load_state_dict(loaded, strict=strict)
    if not strict:
        unexpected = [k for k in result.missing_keys if not k.startswith(OPTIONAL_PREFIXES)]
        if unexpected or result.unexpected_keys:
            raise CheckpointError(
                f"{path}: missing {unexpected}, unexpected {result.unexpected_keys}"
            )
    return state


def save_weights(path: Path, model: torch.nn.Module, run_state: RunState) -> Path:
    """A weights-only checkpoint at ``path`` (no optimizer or RNG state), written atomically:
    what ``checkpoint.init_from`` reads."""
    return write_weights(
        path, run_state, lambda d: dist_checkpointing.save(model.sharded_state_dict(), str(d))
    )


@deferred()
def write_weights(path: Path, run_state: RunState, write_model: Callable[[Path], None]) -> Path:
    """A weights-only checkpoint at ``path`` whose ``model/`` directory ``write_model`` writes
    (a model's save, or a conversion's streaming one), sealed atomically like every other."""
    tmp = path.with_name(f".tmp-{path.name}")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
    _barrier()
    write_model(tmp / "model")
    _barrier()
    _seal(tmp, path, run_state)
    _barrier()
    return path


@contextlib.contextmanager
def _weights_kept_once(engine: Any) -> Iterator[None]:
    """DeepSpeed writes the module's whole state dict into its ``model_states`` file beside the
    ZeRO optimizer state; the weights are already in the checkpoint's ``model/`` (megatron's
    distributed checkpoint, which also reshards), so DeepSpeed is handed an empty module state
    dict for the save. Loading restores the weights from ``model/`` first and then asks
    DeepSpeed for its optimizer state with ``load_module_strict=False``, which the empty dict
    satisfies. DeepSpeed has no option for this; its ``module_state_dict`` method is shadowed
    on the engine instance for the duration of the save only."""
    engine.module_state_dict = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        del engine.module_state_dict


def _seal(tmp: Path, final: Path, run_state: RunState) -> None:
    """Every rank, once every rank's files are in ``tmp``: rank 0 writes the run state, the
    ranks hash every file between them into the manifest (which so covers the run state too:
    a flipped byte in its config would otherwise load unnoticed), and rank 0 syncs the
    directories and moves the checkpoint into place. The rename is what marks it complete."""
    if _rank() == 0:
        _save_torch(run_state.to_dict(), tmp / RUN_STATE)
    _barrier()
    write_manifest(tmp)
    if _rank() == 0:
        for sub in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            fsync_dir(sub)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def load_training_state(
    path: Path, optimizer: torch.optim.Optimizer, engine: Any, same_layout: bool
) -> bool:
    """This rank's optimizer and RNG state; False (and a warning) when the layout changed."""
    rank_file = path / f"rank_{_rank():05d}.pt"
    if not same_layout or not rank_file.exists():
        log.warning(
            "%s was saved at another parallel layout: weights resharded, optimizer state "
            "reinitialised (Adam moments restart from zero)",
            path,
        )
        return False
    rank_state = safe_torch_load(rank_file)
    if engine is None:
        optimizer.load_state_dict(rank_state["optimizer"])
    else:
        with restricted_checkpoint_reads(engine):
            engine.load_checkpoint(
                str(path / DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=False,
            )
    restore_rng_state(rank_state["rng"])
    return True


@contextlib.contextmanager
def full_parameters(engine: Any, model: torch.nn.Module) -> Iterator[None]:
    """Whole parameters for the duration (ZeRO-3 keeps only a partition on each rank)."""
    if engine is None or engine.zero_optimization_stage() < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
