"""A real Slurm cluster on this one host: munged, slurmctld and two slurmd daemons ("nodes").

The Slurm tests run sci-scale's templates through Debian's slurm-wlm, not a mock, so what they
prove (srun task placement, rank and address discovery, --signal, requeue) is what a cluster does.
Both nodes are the same machine: they listen on 127.0.0.1 with distinct ports, and their names do
not resolve, which is why jobs take the master address from Slurm's NodeAddr.

Everything lives under one private prefix; the daemons run in the foreground of their own process
groups and ``stop()`` kills them by pid, so a failing test never leaves a cluster behind.
Running it needs root (slurmd spawns jobs as their users) and, when the packages are missing,
Debian's package registry.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from launchers import free_port

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


class ClusterError(RuntimeError):
    pass


def ensure_installed() -> None:
    """apt-get the Slurm and munge packages when any binary is missing (root only)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterError(
            "Slurm is not installed and installing it needs root: "
            f"apt-get install {' '.join(PACKAGES)} (or deselect with -m 'not slurm')"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stderr}")


@dataclass
class LocalSlurm:
    """A two-node Slurm cluster under ``prefix``; ``env`` is what a client command needs."""

    prefix: Path
    nodes: tuple[str, ...] = ("node1", "node2")
    cpus_per_node: int = 1
    memory_mb: int = 4096
    procs: list[subprocess.Popen] = field(default_factory=list)
    startup_s: float = 0.0

    @property
    def conf(self) -> Path:
        return self.prefix / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        p = self.prefix
        for d in ("munge", "spool", "state", "log", "run"):
            (p / d).mkdir(parents=True, exist_ok=True)
        (p / "munge").chmod(0o700)
        (p / "log").chmod(0o755)
        host = socket.gethostname().split(".")[0]
        ctl_port, node_ports = free_port(), [free_port() for _ in self.nodes]
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN"
            for name, port in zip(self.nodes, node_ports, strict=True)
        )
        self.conf.write_text(
            f"""ClusterName=sci-scale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={p}/run/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={p}/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation={p}/state
SlurmdSpoolDir={p}/spool/%n
SlurmctldPidFile={p}/run/slurmctld.pid
SlurmdPidFile={p}/run/slurmd-%n.pid
SlurmctldLogFile={p}/log/slurmctld.log
SlurmdLogFile={p}/log/slurmd-%n.log
SchedulerType=sched/backfill
# A requeued job is eligible again after cred_expire; look for it every second, not every 60.
SchedulerParameters=sched_interval=1
InactiveLimit=0
KillWait=10
MinJobAge=600
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        for name in self.nodes:
            (p / "spool" / name).mkdir(exist_ok=True)

    def _spawn(self, argv: list[str], log_name: str) -> None:
        log = open(self.prefix / "log" / log_name, "ab")  # noqa: SIM115 - owned by the daemon
        self.procs.append(
            subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def start(self, timeout_s: float = 60.0) -> LocalSlurm:
        t0 = time.perf_counter()
        ensure_installed()
        self._write_config()
        p = self.prefix
        key = p / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        key.chmod(0o600)
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={p}/run/munge.socket",
                f"--key-file={key}",
                f"--pid-file={p}/run/munged.pid",
                f"--log-file={p}/log/munged.log",
                f"--seed-file={p}/munge/munged.seed",
            ],
            "munged.out",
        )
        self._wait(lambda: (p / "run" / "munge.socket").exists(), timeout_s, "munged socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for name in self.nodes:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}.out")
        self._wait(self._all_idle, timeout_s, "nodes idle")
        self.startup_s = time.perf_counter() - t0
        return self

    def _all_idle(self) -> bool:
        dead = [proc.args[0] for proc in self.procs if proc.poll() is not None]
        if dead:
            raise ClusterError(f"{dead} exited; logs in {self.prefix / 'log'}")
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True
        )
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return proc.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}; logs in {self.prefix / 'log'}")
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for item in out.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for_job(self, job_id: str, timeout_s: float) -> str:
        """Poll until the job reaches a final state; on timeout cancel it and raise."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        deadline = time.monotonic() + timeout_s
        while (state := self.job_state(job_id)) not in final:
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise ClusterError(f"job {job_id} still {state} after {timeout_s:.0f} s")
            time.sleep(1.0)
        return state

    def stop(self) -> None:
        """Cancel every job, then kill the daemons (and whatever they spawned) by pid."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
