"""When a run stops early: a preemption signal or the wall-clock budget, agreed by every rank.

Slurm sends SIGUSR1 (``--signal``) or SIGTERM before it ends a job; the run finishes the step in
progress, saves a checkpoint and exits cleanly, so that the requeued job resumes exactly.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

from sci_scale.runtime import collectives

log = logging.getLogger("sci_scale.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopConditions:
    """Signal handlers installed for the duration of a ``with`` block, and the wall clock.

    ``max_wall_minutes`` counts from ``started`` (``time.monotonic()``; default: now)."""

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
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after this step", name)
        self.signal_received = name

    def reason(self) -> str | None:
        """Why to stop after this step, agreed by every rank.

        Slurm signals each task on its own, so ranks may see a signal one step apart; the wall
        clock is read on rank 0. One max-reduction of two flags makes every rank stop (and
        save) at the same step, which a collective checkpoint needs.
        """
        limit = self.max_wall_minutes
        over_time = (
            self.is_main and limit is not None and time.monotonic() - self.started >= limit * 60
        )
        flags = [self.signal_received is not None, over_time]
        if self.world_size > 1:
            flags = collectives.all_reduce_values(flags, op=collectives.ReduceOp.MAX)
        if flags[0]:
            return f"signal {self.signal_received or 'on another rank'}"
        if flags[1]:
            return f"train.max_wall_minutes={limit} reached"
        return None
