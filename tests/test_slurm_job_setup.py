"""The batch script's cluster setup (``slurm.setup``, ``slurm.env``) and its restart policy,
run with Slurm and sci-scale replaced by shell functions: which lines run, what the tasks
inherit, and when the job is queued again. tests/test_slurm.py runs the real thing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import small_overrides

from sci_scale.config import ConfigError, load_config
from sci_scale.launch.slurm import SubmitOptions, render_script

# srun records its arguments and the environment its tasks would inherit, and "trains" with
# exit status $TRAIN_RC; the launcher's `status --finished` answers $FINISHED_RC.
HARNESS = r"""
rec() { printf '%s\x1f' "$@" >> "$REC"; printf '\x1e' >> "$REC"; }
srun() {
  rec srun "$@"
  if [[ " $* " == *" train "* ]]; then
    rec env "${PYTHONFAULTHANDLER-}" "${CUDA_DEVICE_MAX_CONNECTIONS-}" "${WEIRD-}" \
      "${FROM_SETUP-}"
    return "$TRAIN_RC"
  fi
}
scontrol() { rec scontrol "$@"; [ "$1" != show ] || echo node1; }
sinfo() { echo 10.0.0.1; }
fake-sci-scale() { rec fake-sci-scale "$@"; return "$FINISHED_RC"; }
source "$1"
"""


def render(tmp_path: Path, *overrides: str, **options) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*small_overrides(run_dir, tmp_path / "cache"), *overrides])
    opts = SubmitOptions(gpus_per_node=0, launcher="fake-sci-scale", **options)
    return render_script(cfg, run_dir / "slurm" / "train.yaml", opts), run_dir


def run(script: str, run_dir: Path, train_rc: int, finished_rc: int = 3, restart: int = 0):
    """Run the script; (exit status, the calls it made, restarts.log lines)."""
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path, rec = run_dir.parent / "job.sbatch", run_dir.parent / "calls"
    path.write_text(script)
    rec.unlink(missing_ok=True)
    env = {**os.environ, "REC": str(rec), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1",
           "SLURM_RESTART_COUNT": str(restart), "TRAIN_RC": str(train_rc),
           "FINISHED_RC": str(finished_rc)}  # fmt: skip
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    proc = subprocess.run(["bash", "-c", HARNESS, "harness", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    calls = [c.split("\x1f")[:-1] for c in rec.read_text().split("\x1e")[:-1]]
    log = run_dir / "slurm" / "restarts.log"
    return proc.returncode, calls, log.read_text().splitlines() if log.exists() else []


def test_setup_lines_run_in_order_and_the_tasks_inherit_the_environment(tmp_path) -> None:
    weird = 'a b $HOME "d" `x`; y'  # no single quote: the override wraps it in them
    script, run_dir = render(
        tmp_path,
        "slurm.setup=['export FROM_SETUP=venv', 'rec setup \"$FROM_SETUP\"']",
        f"slurm.env={{CUDA_DEVICE_MAX_CONNECTIONS: '1', WEIRD: '{weird}'}}",
    )
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    rc, calls, _ = run(script, run_dir, train_rc=0, finished_rc=0)
    assert rc == 0
    names = [call[0] for call in calls]
    assert names.index("setup") < names.index("srun")  # set up before the tasks start
    assert calls[names.index("setup")] == ["setup", "venv"]
    assert ["env", "1", "1", weird, "venv"] in calls  # faulthandler, env values exactly
    train = next(c for c in calls if c[0] == "srun")
    assert "--label" in train and "--kill-on-bad-exit=1" in train


@pytest.mark.parametrize(
    ("train_rc", "finished_rc", "restart", "expect_rc", "requeued", "reason"),
    [
        (0, 0, 0, 0, False, None),  # finished
        (0, 3, 0, 0, True, "training stopped before train.steps (a signal or the time limit)"),
        (2, 3, 0, 2, False, None),  # a configuration error would only repeat
        (137, 3, 0, 0, True, "training exited with status 137 (a crash, a killed rank"),
        (0, 3, 5, 1, False, "training stopped before train.steps"),  # max_restarts=5 reached
    ],
    ids=["finished", "stopped", "config-error", "crash", "out-of-restarts"],
)
def test_the_restart_policy(
    tmp_path, train_rc, finished_rc, restart, expect_rc, requeued, reason
) -> None:
    script, run_dir = render(tmp_path, "slurm.max_restarts=5")
    rc, calls, restarts = run(script, run_dir, train_rc, finished_rc, restart)
    assert rc == expect_rc
    assert (["scontrol", "requeue", "77"] in calls) == requeued
    if reason is None:
        assert restarts == []
    else:
        assert len(restarts) == 1 and f"job 77 restart {restart}: {reason}" in restarts[0]


def test_a_second_crash_without_a_new_checkpoint_is_not_requeued(tmp_path) -> None:
    script, run_dir = render(tmp_path)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_0000005\n")
    assert run(script, run_dir, train_rc=1)[0] == 0  # requeued
    rc, calls, restarts = run(script, run_dir, train_rc=1, restart=1)
    assert rc == 1 and ["scontrol", "requeue", "77"] not in calls
    assert len(restarts) == 1
    (run_dir / "checkpoints" / "latest").write_text("step_0000010\n")  # progress: requeue again
    rc, calls, restarts = run(script, run_dir, train_rc=1, restart=2)
    assert rc == 0 and ["scontrol", "requeue", "77"] in calls and len(restarts) == 2


def test_the_submit_option_overrides_slurm_max_restarts(tmp_path) -> None:
    assert "MAX_REQUEUES=7\n" in render(tmp_path, "slurm.max_restarts=7")[0]
    assert "MAX_REQUEUES=3\n" in render(tmp_path, "slurm.max_restarts=7", max_requeues=3)[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("slurm.env={'BAD-NAME': x}", "slurm.env.BAD-NAME: 'BAD-NAME' is not an environment"),
        ('slurm.env={OK: "a\\nb"}', "slurm.env.OK 'a\\nb' contains a newline"),
        ('slurm.setup=["module load x\\nrm -rf /"]', "slurm.setup[0] 'module load x\\nrm"),
        ('slurm.container="img\\n"', "slurm.container 'img\\n' contains a newline"),
    ],
)
def test_values_that_would_break_the_script_are_refused(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError) as info:
        render(tmp_path, override)
    assert str(info.value).startswith(message)


def test_srun_args_reach_srun_as_given(tmp_path) -> None:
    script, run_dir = render(tmp_path, "slurm.srun_args=['--cpu-bind=cores', '--comment=a b']")
    _, calls, _ = run(script, run_dir, train_rc=0, finished_rc=0)
    train = next(c for c in calls if c[0] == "srun")
    assert train[train.index("--cpu-bind=cores") + 1] == "--comment=a b"
    with pytest.raises(ConfigError, match=r"slurm.srun_args\[0\] 'rm' is not an srun option"):
        render(tmp_path, "slurm.srun_args=[rm]")


def test_gpu_jobs_ask_for_the_whole_node_memory_unless_told(tmp_path) -> None:
    cfg = load_config(None, small_overrides(tmp_path / "run", tmp_path / "cache"))
    path = tmp_path / "c.yaml"
    assert "#SBATCH --mem=0\n" in render_script(cfg, path, SubmitOptions(gpus_per_node=8))
    assert "#SBATCH --mem=200G\n" in render_script(
        cfg, path, SubmitOptions(gpus_per_node=8, mem="200G")
    )
    assert "--mem" not in render_script(cfg, path, SubmitOptions(gpus_per_node=0))


def test_a_container_from_the_config_or_the_command_line(tmp_path) -> None:
    script, _ = render(tmp_path, "slurm.container=nvcr.io/me/sci:1", "slurm.container_mounts=/d")
    assert "--container-image=nvcr.io/me/sci:1 --container-mounts=/d" in script
    assert "SCI_SCALE=(fake-sci-scale)" in script  # an explicit launcher is kept
    script, _ = render(tmp_path, "slurm.container=a", container_image="b")
    assert "--container-image=b " in script  # the submit option wins
