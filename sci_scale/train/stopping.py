"""When a run stops early: a preemption signal or the wall-clock budget, agreed by every rank.

Slurm sends SIGUSR1 (``--signal``) or SIGTERM before it ends a job; the run finishes the step in
progress, saves a checkpoint and exits cleanly, so that the requeued job resumes exactly.

A signal can come before the trainer installs its handlers (while torch imports, the data
builds or a checkpoint loads), where Python's default would end the process with no word and
status 138 or 143. So ``sci-scale train`` holds the signals from its first line
(:func:`hold_early_signals`: noted, not acted on), and :class:`StopConditions` takes over any
noted one when it starts: the run stops before its first step, with nothing new to save, the
same clean stop as a signal during training. This module imports no torch at import time, so
the command line can hold the signals before it loads anything heavy.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from sci_scale.runtime.signals import STOP_SIGNALS

log = logging.getLogger("sci_scale.train")


# Signals noted by the early handler and not yet taken over by a StopConditions, in order.
_early: list[str] = []


def _note_early(signum: int, _frame: FrameType | None) -> None:
    _early.append(signal.Signals(signum).name)


def hold_early_signals() -> dict[int, Any]:
    """Note SIGTERM/SIGUSR1 instead of dying of them, until :func:`release_early_signals`;
    returns the handlers they replaced (none outside the main thread, which cannot set any)."""
    _early.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _note_early)
    return previous


def release_early_signals(previous: dict[int, Any]) -> str | None:
    """Put back the handlers :func:`hold_early_signals` replaced; returns the first signal noted
    and never taken over by a :class:`StopConditions` (None when there was none)."""
    for s, handler in previous.items():
        signal.signal(s, handler)
    pending = _early[0] if _early else None
    _early.clear()
    return pending


class StopConditions:
    """Signal handlers installed for the duration of a ``with`` block, and the wall clock.

    ``max_wall_minutes`` counts from ``started`` (``time.monotonic()``; default: now). A signal
    held before the block (:func:`hold_early_signals`) counts as received when it starts."""

    def __init__(
        self,
        max_wall_minutes: float | None,
        is_main: bool,
        world_size: int,
        started: float | None = None,
    ) -> None:
        self.max_wall_minutes = max_wall_minutes
        self.is_main = is_main
        self.world_size = world_size
        self.started = time.monotonic() if started is None else started
        self.signal_received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopConditions:
        self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            try:
                signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: leave the handlers to the host
                self._previous.pop(s)
        if _early:
            self.signal_received = _early[0]
            log.warning("received %s during set-up: stopping before the first step", _early[0])
            _early.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after this step", name)
        self.signal_received = name

    def reason(self, wall_clock: bool = True) -> str | None:
        """Why to stop after this step, agreed by every rank (every rank must call it alike).

        Slurm signals each task on its own, so ranks may see a signal one step apart; the wall
        clock is read on rank 0. One max-reduction of two flags makes every rank stop (and
        save) at the same step, which a collective checkpoint needs. ``wall_clock=False``
        asks about signals only: before the first step, where a run whose set-up outlasts
        ``train.max_wall_minutes`` must still make one step of progress per job.
        """
        limit = self.max_wall_minutes
        over_time = (
            wall_clock
            and self.is_main
            and limit is not None
            and time.monotonic() - self.started >= limit * 60
        )
        flags = [self.signal_received is not None, over_time]
        if self.world_size > 1:
            # Imported here: the command line imports this module before torch is loaded.
            from sci_scale.runtime import collectives

            flags = collectives.all_reduce_values(flags, op=collectives.ReduceOp.MAX)
        if flags[0]:
            return f"signal {self.signal_received or 'on another rank'}"
        if flags[1]:
            return f"train.max_wall_minutes={limit} reached"
        return None
