"""The hang watch: a step that takes longer than ``train.hang_timeout_s`` ends the process with
every thread's stack on stderr, so that a job stuck on a dead peer or a wedged collective fails
(and its batch script requeues it) instead of idling until its time limit.

It is Python's own watchdog, ``faulthandler.dump_traceback_later(exit=True)``: a C thread that
needs neither the GIL nor a responsive main thread, re-armed at the start of every step (the
window covers the step, its evaluation and its checkpoint) and cancelled when training ends.
Every rank arms its own, so each rank of a hung job dumps where it waits: the rank that hangs
and the ones blocked in a collective with it. The dump starts with ``Timeout (H:MM:SS)!``; the
process then exits with status 1, which ``srun --kill-on-bad-exit`` turns into the end of the
job step. Set-up (data build, checkpoint load) is not watched: it can legitimately take long.
The process-group timeouts of torch (and NCCL's watchdog with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``)
remain in force beneath it.
"""

from __future__ import annotations

import faulthandler
import logging
import sys

log = logging.getLogger("sci_scale.train")


class HangWatch:
    """``timeout_s`` None: off."""

    def __init__(self, timeout_s: float | None, is_main: bool) -> None:
        self.timeout_s = timeout_s
        self.armed = False
        if timeout_s is not None and is_main:
            log.info(
                "hang watch: a step longer than %gs (train.hang_timeout_s) dumps every rank's "
                "stacks and ends the job",
                timeout_s,
            )

    def step_started(self) -> None:
        """(Re)start the window for the step about to run."""
        if self.timeout_s is None:
            return
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
        self.armed = True

    def stop(self) -> None:
        if self.armed:
            faulthandler.cancel_dump_traceback_later()
            self.armed = False
