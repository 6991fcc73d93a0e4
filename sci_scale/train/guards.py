"""Non-finite guards: a step whose update would be harmful is skipped, and nothing non-finite
is ever saved.

Before every optimizer update the trainer asks :class:`StepGuard` whether to apply it. A step is
skipped when the global LM loss or the global gradient norm is NaN or infinite, or, with
``train.loss_spike_factor`` set, when the loss exceeds that factor times the median of the last
``train.loss_spike_window`` applied steps' losses. The spike policy starts once the window holds
half its size (rounded up) of applied steps; skipped steps never enter it. Every rank takes part
in one max-reduction of the decision, so all ranks skip the same steps and none steps alone.

A skipped step still counts as a step: its data is consumed, the step number, the learning rate
and the SCL weight advance as functions of the step. What it leaves untouched is the model and
the optimizer: weights, AdamW moments and AdamW's step count are those of the previous step.
``train.max_consecutive_skips`` skipped steps in a row stop the run with
:class:`TrainingDiverged`. The loss window and the counts restart when a run resumes.

Without DeepSpeed the gradients are dropped instead of stepped. Under DeepSpeed ZeRO, where the
gradients live in ZeRO's own buffers until ``engine.step()`` consumes them, a skipped step runs
``engine.step()`` (which reduces, uses and clears those buffers the same way whatever happens)
inside :func:`undone_step`, which puts back every tensor the step may write. That costs one copy
of this rank's weights and optimizer partition in host memory, on skipped steps only; DeepSpeed's
own counters (``global_steps``, ``skipped_steps``) advance, and nothing reads them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sci_scale.checkpoint.index import CheckpointError
from sci_scale.config import Config
from sci_scale.errors import UserError
from sci_scale.runtime import collectives
from sci_scale.train.grads import NonFiniteWatch

log = logging.getLogger("sci_scale.train")

# Reasons in increasing priority: ranks agree on the highest one any of them saw.
REASONS = ("loss_spike", "nonfinite_grad_norm", "nonfinite_loss")


class TrainingDiverged(UserError):
    """Too many steps in a row had to be skipped: the run cannot make progress as configured."""


@dataclass(frozen=True)
class Skip:
    reason: str  # one of REASONS
    value: float  # the loss, or the gradient norm, that decided it
    detail: str = ""

    def describe(self) -> str:
        return f"{self.reason}: {self.value:.6g}{self.detail}"


class StepGuard:
    """The skip decision, the loss window and the skip counts of one run (see the module).

    ``watched``: under DeepSpeed, the model whose gradients :class:`NonFiniteWatch` follows
    (there is no global norm before the update); None when the caller passes the norm."""

    def __init__(
        self, cfg: Config, world_size: int, is_main: bool, watched: torch.nn.Module | None = None
    ) -> None:
        t = cfg.train
        self.max_consecutive = t.max_consecutive_skips
        self.spike_factor = t.loss_spike_factor
        size = max(1, t.loss_spike_window)
        self.window: deque[float] = deque(maxlen=size)
        self.needed = math.ceil(size / 2)  # applied steps before the spike policy starts
        self.lr = t.lr
        self.checkpoints = f"{cfg.run.dir}/checkpoints"
        self.world_size = world_size
        self.is_main = is_main
        self.watch = NonFiniteWatch(watched) if watched is not None else None
        self.total = 0
        self.consecutive = 0
        self.first_of_streak = 0
        self.last: tuple[int, Skip] | None = None

    # -- the decision --------------------------------------------------------------------
    def _local(self, loss: float, grad_norm: float) -> Skip | None:
        if not math.isfinite(loss):
            return Skip("nonfinite_loss", loss)
        if not math.isfinite(grad_norm):
            return Skip("nonfinite_grad_norm", grad_norm)
        if self.spike_factor is not None and len(self.window) >= self.needed:
            median = statistics.median(self.window)
            if loss > self.spike_factor * median:
                detail = f" > {self.spike_factor:g} x median {median:.6g}"
                return Skip("loss_spike", loss, detail)
        return None

    def decide(self, loss: float, grad_norm: float | None = None) -> Skip | None:
        """Whether to skip this step's update, the same answer on every rank.

        ``grad_norm``: the global norm (ZeRO-0); None reads the gradient watch (DeepSpeed)."""
        if grad_norm is None:
            grad_norm = self.watch.read_and_reset() if self.watch is not None else 0.0
        local = self._local(loss, grad_norm)
        if self.world_size == 1:
            return local
        code = 0 if local is None else REASONS.index(local.reason) + 1
        (agreed,) = collectives.all_reduce_values([code], op=collectives.ReduceOp.MAX)
        if int(agreed) == code:
            return local
        reason = REASONS[int(agreed) - 1]
        value = loss if reason != "nonfinite_grad_norm" else float("nan")
        return Skip(reason, value, " (on another rank)" if reason != "nonfinite_loss" else "")

    # -- the bookkeeping -----------------------------------------------------------------
    def record(self, step: int, skip: Skip | None, loss: float) -> None:
        """Count the step; an applied step's loss joins the spike window."""
        if skip is None:
            self.consecutive = 0
            self.window.append(loss)
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self.first_of_streak = step
        self.last = (step, skip)
        if self.is_main:
            log.warning(
                "step %d: update skipped (%s); %d in a row, %d in total",
                *(step, skip.describe(), self.consecutive, self.total),
            )

    def stop_if_diverged(self) -> None:
        """Raise :class:`TrainingDiverged` after ``train.max_consecutive_skips`` in a row."""
        if self.last is None or self.consecutive < self.max_consecutive:
            return
        step, skip = self.last
        raise TrainingDiverged(
            f"training diverged: {self.consecutive} steps in a row skipped "
            f"(train.max_consecutive_skips={self.max_consecutive}), the last at step {step} "
            f"({skip.describe()}); lower train.lr (now {self.lr:g}) or restart from a "
            f"checkpoint saved before step {self.first_of_streak} under {self.checkpoints}"
        )


# -- DeepSpeed: a step that leaves nothing behind ----------------------------------------
def _written_by_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module):
    """Every tensor an optimizer step may write: the optimizer's own parameters (ZeRO's fp32
    master partitions), their state, and the model's weights (under ZeRO-3 their partitions)."""
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        tensors += group["params"]
    for p in model.parameters():
        if p.numel() > 0:
            tensors.append(p)
        partition = getattr(p, "ds_tensor", None)
        if isinstance(partition, torch.Tensor):
            tensors.append(partition)
    return tensors


@contextlib.contextmanager
def undone_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Iterator[None]:
    """Run the body (an ``engine.step()``), then restore every tensor it may have written.

    State an optimizer creates during the body (AdamW's moments at a run's first step) is set
    to zero, AdamW's "no state yet": the next update is the one a fresh optimizer makes."""
    tensors = _written_by_step(optimizer, model)
    saved = [t.detach().to("cpu", copy=True) for t in tensors]
    state_before = {
        id(p): {
            k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in s.items()
        }
        for p, s in optimizer.state.items()
    }
    yield
    with torch.no_grad():
        for tensor, copy in zip(tensors, saved, strict=True):
            tensor.data.copy_(copy)
        for p, state in optimizer.state.items():
            before = state_before.get(id(p), {})
            for key, value in state.items():
                if key in before and torch.is_tensor(value):
                    value.copy_(before[key])
                elif key in before:
                    state[key] = before[key]
                elif torch.is_tensor(value):
                    value.zero_()
                else:
                    state[key] = type(value)(0)


def deepspeed_step(
    engine: Any, optimizer: torch.optim.Optimizer, model: torch.nn.Module, skip: Skip | None
) -> tuple[float, Skip | None]:
    """``engine.step()``, applied or undone as ``skip`` says; returns (global norm, skip).

    A step DeepSpeed discards itself (its own overflow check on the norm it computes) is
    reported as skipped too; DeepSpeed agrees on that across its ranks."""
    skipped_before = engine.skipped_steps
    if skip is None:
        engine.step()
    else:
        with undone_step(optimizer, model):
            engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    if skip is None and engine.skipped_steps > skipped_before:
        skip = Skip("nonfinite_grad_norm", norm, " (DeepSpeed's overflow check)")
    return norm, skip


# -- checkpoints -------------------------------------------------------------------------
def _named_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    for name, p in model.named_parameters():
        partition = getattr(p, "ds_tensor", None)
        yield name, partition if isinstance(partition, torch.Tensor) else p
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            yield f"optimizer group {g} parameter {i}", p
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    yield f"optimizer group {g} parameter {i} {key}", value


def _first_non_finite(named: Iterator[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None. One flag per tensor
    stays on the tensor's device and each device is read once: a host sync per device, not per
    tensor (thousands of them at scale)."""
    names: list[str] = []
    flags: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in named:
        if tensor.numel():
            flags.setdefault(tensor.device, []).append(
                (len(names), torch.isfinite(tensor.detach()).all())
            )
            names.append(name)
    bad = []
    for entries in flags.values():
        finite = torch.stack([flag for _, flag in entries]).cpu()
        bad += [entries[i][0] for i in (~finite).nonzero().flatten().tolist()]
    return names[min(bad)] if bad else None


def check_finite_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, world_size: int
) -> None:
    """Refuse to save a checkpoint holding a NaN or infinite weight or optimizer value.

    Collective: every rank checks what it holds and one max-reduction makes all of them refuse
    together. The step guard should make this unreachable; it keeps ``latest`` (and with it
    ``--auto-resume``) on the last finite state if anything ever slips past it."""
    bad_name = _first_non_finite(_named_state(model, optimizer))
    bad = bad_name is not None
    if world_size > 1 and dist.is_initialized():
        (flag,) = collectives.all_reduce_values([bad], op=collectives.ReduceOp.MAX)
        bad = bool(flag)
    if bad:
        where = f"{bad_name!r}" if bad_name else "a tensor on another rank"
        raise CheckpointError(
            f"refusing to save the checkpoint of step {step}: {where} holds NaN or infinite "
            "values; the last saved checkpoint is kept (lower train.lr and resume from it)"
        )
