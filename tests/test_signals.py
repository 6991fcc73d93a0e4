"""A job-wide signal cannot kill the helper processes of a checkpoint save, and the trainer
still receives it once the save is over (``sci_scale.runtime.signals.deferred``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

from launchers import REPO

# Run in a fresh interpreter: the test process's own signal state must not leak into others.
SCRIPT = """
import multiprocessing, os, signal, time
from sci_scale.runtime.signals import deferred

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
if __name__ == "__main__":
    with deferred():
        # what megatron's checkpoint writer starts at the first save: a manager (spawn) ...
        manager = multiprocessing.get_context("spawn").Manager()
        queue = manager.Queue()
        # ... and forked writers
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(1,))
        child.start()
        for pid in (manager._process.pid, child.pid, os.getpid()):  # as Slurm signals a step
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        assert received == [], "delivered during the save"
        queue.put("written")
        assert queue.get() == "written"  # the manager survived
        child.join()
        assert child.exitcode == 0, child.exitcode
    assert received == [signal.SIGTERM], received  # delivered once the save is over
    print("OK")
"""


def test_helpers_started_during_a_save_survive_a_job_wide_sigterm(tmp_path) -> None:
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_outside_the_main_thread_nothing_is_blocked() -> None:
    import threading

    from sci_scale.runtime.signals import deferred

    masks = []

    def body() -> None:
        with deferred():
            masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert signal.SIGTERM not in masks[0]
    assert multiprocessing.current_process().name == "MainProcess"


HANG = """
import time
from sci_scale.train.hang import HangWatch

watch = HangWatch(1.0, is_main=True)
for step in range(3):  # steps shorter than the window re-arm it and pass
    watch.step_started()
    time.sleep(0.4)
watch.step_started()
time.sleep(30)  # a hung step
"""


def test_the_hang_watch_dumps_the_stacks_and_exits_after_a_long_step(tmp_path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert "Timeout (0:00:01)!" in proc.stderr
    assert f'File "{script}", line 10 in <module>' in proc.stderr  # where it hung


def test_hang_timeout_must_be_positive() -> None:
    from sci_scale.config import ConfigError, load_config

    assert load_config(None, ["train.hang_timeout_s=600"]).train.hang_timeout_s == 600.0
    try:
        load_config(None, ["train.hang_timeout_s=0"])
    except ConfigError as exc:
        assert str(exc).startswith("train.hang_timeout_s must be positive")
    else:
        raise AssertionError("accepted")
