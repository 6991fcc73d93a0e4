"""sci-scale on a real Slurm cluster: two slurmd "nodes" on this host (see ``slurm_cluster``).

The jobs are submitted with ``sci-scale submit`` exactly as a user would, run one task per node
(gloo on CPU), and are compared step by step with the same training under torchrun. The cluster
is started once for the module and stopped when it ends, pass or fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import small_overrides
from launchers import REPO, failure_summary, torchrun
from slurm_cluster import LocalSlurm

from sci_scale.train.metrics import read_metrics

# A cluster takes seconds to start and each job trains: never part of the fast loop.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    local = LocalSlurm(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        local.start()
        print(f"\nSlurm cluster with {len(local.nodes)} nodes up in {local.startup_s:.1f}s")
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm-runs")


def run_overrides(run_dir: Path, cache: Path) -> list[str]:
    return [
        *small_overrides(run_dir, cache),
        f"train.steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=20",
    ]


@pytest.fixture(scope="module")
def torchrun_records(runs: Path, data_cache: Path) -> list[dict]:
    """The same training, two processes under torchrun: what the Slurm jobs must reproduce."""
    run_dir = runs / "torchrun"
    proc = torchrun(2, run_overrides(run_dir, data_cache))
    assert proc.returncode == 0, failure_summary(proc)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert any(r["scl_loss"] is not None for r in records)  # pair blocks and SCL are exercised
    return records


def submit(cluster: LocalSlurm, run_dir: Path, cache: Path, *extra: str) -> str:
    proc = subprocess.run(
        [
            sys.executable, "-m", "sci_scale", "submit", *run_overrides(run_dir, cache), *extra,
            "--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00",
        ],
        env=cluster.env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    assert f"run directory {run_dir}" in proc.stdout
    return match.group(1)


def job_output(run_dir: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob(f"*-{job_id}.*")))


def assert_same_losses(records: list[dict], expected: list[dict]) -> None:
    """Same layout, same processes: the losses are bitwise those of the torchrun run."""
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for got, want in zip(records, expected, strict=True):
        for key in ("lm_loss", "scl_loss", "grad_norm", "pair_blocks", "consumed_samples"):
            assert got[key] == want[key], (got["step"], key, got[key], want[key])


def test_two_node_job_matches_torchrun(
    cluster: LocalSlurm, torchrun_records: list[dict], runs: Path, data_cache: Path
) -> None:
    run_dir = runs / "two_nodes"
    t0 = time.perf_counter()
    job_id = submit(cluster, run_dir, data_cache)
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    print(f"\ntwo-node job {job_id}: {state} in {time.perf_counter() - t0:.1f}s")
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out
    assert "on node[1-2], master 127.0.0.1" in out  # one task on each node, rank 0's NodeAddr
    assert "layout: TP1 x PP1 x DP2, ZeRO-0 (2 processes)" in out
    assert_same_losses(read_metrics(run_dir), torchrun_records)

    status = subprocess.run(
        [sys.executable, "-m", "sci_scale", "status", str(run_dir)],
        env=cluster.env, capture_output=True, text=True,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"step       {STEPS}/{STEPS} (finished)" in status.stdout
    assert f"slurm job  {job_id}: COMPLETED" in status.stdout
    assert f"step_{STEPS:07d}" in status.stdout


def wait_for_step(run_dir: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"{path} did not reach step {step} in {timeout_s:.0f}s")


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(
    cluster: LocalSlurm, torchrun_records: list[dict], runs: Path, data_cache: Path
) -> None:
    run_dir = runs / "preempted"
    t0 = time.perf_counter()
    job_id = submit(cluster, run_dir, data_cache)
    wait_for_step(run_dir, 3, JOB_TIMEOUT_S)
    cluster.run("scancel", "--signal=USR1", job_id)
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    print(f"\npreempted job {job_id}: {state} in {time.perf_counter() - t0:.1f}s")
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out

    stop = re.search(r"stopping at step (\d+) \(signal SIGUSR1", out)
    assert stop, out
    stopped_at = int(stop.group(1))
    assert 3 <= stopped_at < STEPS
    assert f"requeueing job {job_id}" in out
    assert "(restart 1)" in out
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}" in out
    # Every step exactly once, and each equal to the uninterrupted run's.
    assert_same_losses(read_metrics(run_dir), torchrun_records)


def test_task_template_runs_any_command_as_a_job(cluster: LocalSlurm, runs: Path) -> None:
    """slurm/task.sbatch (conversion, preprocessing, eval jobs) passes its arguments through."""
    out = runs / "task.out"
    job_id = cluster.run(
        "sbatch", "--parsable", f"--output={out}", "--cpus-per-task=1",
        f"--export=ALL,SCI_SCALE={sys.executable} -m sci_scale",
        str(REPO / "slurm" / "task.sbatch"), "pairs", "scan", "--split", "length", "--part", "test",
        "--format", "txt",
    ).stdout.strip()  # fmt: skip
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    text = out.read_text()
    assert state == "COMPLETED", text
    assert sum(line.startswith("IN: ") for line in text.splitlines()) == 3920  # SCAN length test


def test_a_job_submitted_from_elsewhere_with_relative_paths_trains(
    cluster: LocalSlurm, runs: Path, data_cache: Path
) -> None:
    """Relative run.dir and data.cache_dir, submitted from a directory that is neither the
    repository nor the run's: the job (which starts in its run directory) finds both."""
    elsewhere = runs / "elsewhere"
    elsewhere.mkdir()
    cache = os.path.relpath(data_cache, elsewhere)
    overrides = [
        *small_overrides(Path("runs/relative"), Path(cache)),
        "train.steps=4",
        "checkpoint.interval=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "sci_scale", "submit", *overrides,
         "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00"],
        env={**cluster.env, "PYTHONPATH": str(REPO)}, cwd=elsewhere, capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    run_dir = elsewhere / "runs" / "relative"
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert str(data_cache) in out  # the shared cache was used


def task_pids(run_dir: Path) -> list[int]:
    """PIDs of the training tasks of a run (not srun or the batch shell)."""
    proc = subprocess.run(["pgrep", "-f", f"sci_scale train {run_dir}/slurm/"],
                          capture_output=True, text=True)  # fmt: skip
    pids = []
    for pid in proc.stdout.split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if cmdline and Path(cmdline[0].decode()).name.startswith("python"):
            pids.append(int(pid))
    return sorted(pids)


def test_a_killed_rank_ends_the_job_promptly_and_it_resumes_exactly(
    cluster: LocalSlurm, torchrun_records: list[dict], runs: Path, data_cache: Path
) -> None:
    """kill -9 of one task: srun takes the other down at once (no rank left waiting in a
    collective), the batch script requeues the job with the reason in restarts.log, and the
    restart resumes from the last checkpoint with the uninterrupted run's losses."""
    run_dir = runs / "killed"
    job_id = submit(cluster, run_dir, data_cache, "checkpoint.interval=5")
    wait_for_step(run_dir, 7, JOB_TIMEOUT_S)
    pids = task_pids(run_dir)
    assert len(pids) == 2, pids
    killed_at = time.time()
    subprocess.run(["kill", "-9", str(pids[-1])], check=True)
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out
    assert "training exited with status" in out and f"requeueing job {job_id}" in out
    assert "(restart 1)" in out
    restarts = (run_dir / "slurm" / "restarts.log").read_text().splitlines()
    assert (
        len(restarts) == 1
        and f"job {job_id} restart 0: training exited with status" in (restarts[0])
    )
    ended = datetime.fromisoformat(restarts[0].split()[0]).timestamp()
    assert ended - killed_at < 60, f"the job took {ended - killed_at:.0f}s to end after the kill"
    assert re.search(r"resumed from .*step_00000(05|10)", out), out
    assert_same_losses(read_metrics(run_dir), torchrun_records)
    assert (run_dir / "metrics.superseded.jsonl").exists()  # the killed attempt's records


def test_sigterm_after_a_checkpoint_helper_started_still_saves_requeues_and_resumes(
    cluster: LocalSlurm, torchrun_records: list[dict], runs: Path, data_cache: Path
) -> None:
    """Slurm signals every process of a job step, including the helper process megatron's
    checkpoint writer starts at the first save; that helper must survive the signal, or the
    save the signal asks for fails (BrokenPipe) and the work since the last one is lost."""
    run_dir = runs / "sigterm"
    job_id = submit(cluster, run_dir, data_cache, "checkpoint.interval=2")
    wait_for_step(run_dir, 5, JOB_TIMEOUT_S)
    cluster.run("scancel", "--signal=TERM", job_id)
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out
    stop = re.search(r"stopping at step (\d+) \(signal SIGTERM", out)
    assert stop, out
    assert "BrokenPipe" not in out and "Traceback" not in out
    assert f"requeueing job {job_id}" in out and "(restart 1)" in out
    assert f"step_{int(stop.group(1)):07d}" in out
    assert_same_losses(read_metrics(run_dir), torchrun_records)


HANGING_LAUNCHER = """
import os, sys, time
from pathlib import Path

# Rank 1 of the job's first run hangs in its {hang_at}th collective, as a dead peer or a wedged
# NCCL operation would leave it; every later restart runs normally.
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and os.environ.get("SLURM_PROCID") == "1":
    import sci_scale.runtime.collectives as collectives

    original, calls = collectives.all_reduce_values, []

    def hanging(*args, **kwargs):
        calls.append(1)
        if len(calls) == {hang_at}:
            Path({mark!r}).write_text(str(time.time()))
            time.sleep(3600)
        return original(*args, **kwargs)

    collectives.all_reduce_values = hanging

if __name__ == "__main__":  # megatron's checkpoint writer starts a process that imports this
    from sci_scale.cli.main import main

    sys.exit(main())
"""


def test_a_hung_rank_is_detected_dumps_its_stacks_and_the_job_resumes_exactly(
    cluster: LocalSlurm, torchrun_records: list[dict], runs: Path, data_cache: Path
) -> None:
    timeout_s = 20
    run_dir = runs / "hung"
    mark = runs / "hung-since"
    launcher = runs / "hanging_launcher.py"
    launcher.write_text(HANGING_LAUNCHER.format(hang_at=12, mark=str(mark)))
    job_id = submit(
        cluster, run_dir, data_cache, "checkpoint.interval=2", f"train.hang_timeout_s={timeout_s}",
        "--launcher", f"{sys.executable} {launcher}",
    )  # fmt: skip
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out
    assert mark.exists(), "the rank never hung"
    assert f"Timeout (0:00:{timeout_s})!" in out  # faulthandler's dump ...
    assert "most recent call first" in out and "in hanging" in out  # ... with the hung frame
    restarts = (run_dir / "slurm" / "restarts.log").read_text().splitlines()
    assert len(restarts) == 1 and "training exited with status" in restarts[0]
    detected = datetime.fromisoformat(restarts[0].split()[0]).timestamp()
    waited = detected - float(mark.read_text())
    print(f"\nhang detected and the job ended {waited:.0f}s after it began")
    assert waited < timeout_s + 60
    assert "(restart 1)" in out
    assert_same_losses(read_metrics(run_dir), torchrun_records)


SIGNALLING_LAUNCHER = """
import os, signal, sys

# In the job's first run, every task signals its own process group (as Slurm signals a job
# step) at a chosen moment: {where}.
if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    def send():
        os.kill(0, signal.{signal})

    if {where!r} == "set-up":
        import sci_scale.train.trainer as trainer

        build = trainer.build_data

        def build_data(*args, **kwargs):
            send()
            return build(*args, **kwargs)

        trainer.build_data = build_data
    else:  # in the middle of the save at step {step}: model written, the rest not yet
        import megatron.core.dist_checkpointing as dist_checkpointing

        save = dist_checkpointing.save

        def saving(*args, **kwargs):
            result = save(*args, **kwargs)
            if "step_{step:07d}" in str(args[1]):
                send()
            return result

        dist_checkpointing.save = saving

if __name__ == "__main__":
    from sci_scale.cli.main import main

    sys.exit(main())
"""


@pytest.mark.parametrize(
    ("where", "sig"), [("set-up", "SIGUSR1"), ("save", "SIGTERM")], ids=["set-up", "save"]
)
def test_a_signal_during_set_up_or_a_save_requeues_and_resumes_exactly(
    cluster: LocalSlurm, torchrun_records: list[dict], runs: Path, data_cache: Path, where, sig
) -> None:
    run_dir = runs / f"signal-{where}"
    launcher = runs / f"signal_{where}.py"
    launcher.write_text(SIGNALLING_LAUNCHER.format(where=where, signal=sig, step=4))
    job_id = submit(cluster, run_dir, data_cache, "checkpoint.interval=2",
                    "--launcher", f"{sys.executable} {launcher}")  # fmt: skip
    state = cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    out = job_output(run_dir, job_id)
    assert state == "COMPLETED", out
    assert "Traceback" not in out and f"requeueing job {job_id}" in out and "(restart 1)" in out
    if where == "set-up":
        assert f"received {sig} during set-up: stopping before the first step" in out
        assert "stopping before step 1" in out
    else:  # the save at step 4 completed; the signal, held until then, stops the next step
        assert f"stopping at step 5 (signal {sig}" in out
        assert f"resumed from {run_dir / 'checkpoints' / 'step_0000005'}" in out
    assert_same_losses(read_metrics(run_dir), torchrun_records)
