"""Multi-process launches for tests: torchrun with a hard timeout that cannot leave orphans."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sci_scale_cli(
    *args: str, cwd: Path = REPO, path_dir: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m sci_scale ARGS`` as a user types it, in ``cwd``; ``path_dir`` goes first on
    PATH (for stand-ins of sbatch and friends)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if path_dir is not None:
        env["PATH"] = f"{path_dir}:{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "sci_scale", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


def torchrun(
    nproc: int,
    overrides: list[str],
    *extra: str,
    timeout_s: float = TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``torchrun -m sci_scale train`` with a hard timeout that kills the whole process group."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "-m", "sci_scale", "train", *overrides, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {timeout_s:.0f}s:\n{out[-2000:]}{err[-2000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def failure_summary(proc: subprocess.CompletedProcess, limit: int = 4000) -> str:
    """The lines of a failed multi-process run that say why (errors first, then the tail)."""
    text = f"{proc.stdout}\n{proc.stderr}"
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    return ("\n".join(errors)[-limit // 2 :] + "\n---\n" + text[-limit // 2 :]).strip()


def torchrun_script(script: Path, nproc: int = 2, timeout_s: float = 240) -> Any:
    """Run a Python file under torchrun; returns what its rank 0 printed as ``RESULT<json>``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))
