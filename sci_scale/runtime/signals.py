"""The signals that stop a run, and holding them off the processes a checkpoint save starts.

Slurm delivers a job's signals (``scancel --signal``, the ``--signal`` warning before the time
limit, preemption) to every process of the job step, not only to the training tasks. A save
starts helper processes: megatron's checkpoint writer keeps a ``multiprocessing`` manager for
its results and forks writers. Their default action for SIGTERM and SIGUSR1 is to die, which
turns the save the signal asks for into a ``BrokenPipeError`` and loses the work since the
previous checkpoint. :func:`deferred` blocks the stop signals in the calling thread while a
save runs: a child started meanwhile inherits the blocked mask (``fork`` copies it and ``exec``
keeps it) and never sees them, and the trainer receives what arrived once the block ends.

One catch: ``multiprocessing`` starts its resource tracker with the first child process, and
unblocks SIGINT and SIGTERM in the parent when it has (``resource_tracker.ensure_running``),
which would lift the block half-way through a save. So the tracker is started before blocking.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker

# What Slurm sends before it ends a job (SIGUSR1 with --signal, SIGTERM at the end or on
# preemption); sci-scale stops cleanly on either.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def deferred(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread for the duration (see the module); a no-op outside the
    main thread, where Python's handlers never run anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resource_tracker.ensure_running()  # see the module: it would unblock SIGTERM later
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
