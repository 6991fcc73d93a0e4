"""``sci-scale submit`` without a cluster: the rendered script, and layouts refused before sbatch.

The jobs themselves run on a real Slurm cluster in ``test_slurm.py``; here ``sbatch`` on PATH is
a recorder, to prove that a refused layout never reaches it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import small_overrides
from launchers import sci_scale_cli


def sci_scale(*args: str, path_dir: Path | None = None) -> subprocess.CompletedProcess:
    return sci_scale_cli(*args, path_dir=path_dir)


def test_dry_run_prints_the_script_with_the_key_directives(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = sci_scale(
        "submit", *small_overrides(run_dir, tmp_path / "cache"), "train.global_batch_size=32",
        "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account", "proj",
        "--qos", "high", "--constraint", "h100", "--time", "02:00:00", "--cpus-per-task", "16",
        "--signal-seconds", "300", "--sbatch=--mail-type=END", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=16",
        "--time=02:00:00",
        "--exclusive",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=h100",
        "--signal=USR1@300",
        "--requeue",
        "--open-mode=append",
        f"--output={run_dir}/slurm/%x-%j.out",
        f"--error={run_dir}/slurm/%x-%j.err",
        "--mail-type=END",
    ):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "TP1 x PP1 x DP8" in script
    assert 'train "$CONFIG" --auto-resume' in script
    # the config the job trains is frozen beside its script, one per submission
    assert re.search(
        rf"^CONFIG={re.escape(str(run_dir))}/slurm/train-\d{{8}}-\d{{6}}\.yaml$", script, re.M
    )
    assert "export MASTER_ADDR=" in script and "export MASTER_PORT=" in script
    assert "scontrol requeue" in script
    assert "--container-image" not in script
    assert not run_dir.exists()  # a dry run writes nothing
    # The script is valid bash.
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_container_option_runs_the_tasks_in_the_image(tmp_path: Path) -> None:
    proc = sci_scale(
        "submit", *small_overrides(tmp_path / "run", tmp_path / "cache"),
        "train.global_batch_size=64", "--nodes", "1", "--gpus-per-node", "8", "--no-exclusive",
        "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in proc.stdout
    assert "SCI_SCALE=(python -m sci_scale)" in proc.stdout
    assert "#SBATCH --exclusive" not in proc.stdout


@pytest.mark.parametrize(
    ("layout", "nodes", "gpus", "message"),
    [
        (
            ["parallel.tensor=2", "parallel.pipeline=2", "model.num_layers=4"],
            "3",
            "2",
            "parallel.tensor (2) x parallel.pipeline (2) = 4 must divide --nodes (3) x "
            "--gpus-per-node (2) = 6 processes",
        ),
        (
            ["train.global_batch_size=8", "train.micro_batch_size=4"],
            "2",
            "2",
            "train.global_batch_size (8) must be a multiple of train.micro_batch_size (4) x "
            "data-parallel size (4) = 16",
        ),
    ],
)
def test_a_layout_that_does_not_fit_is_refused_before_sbatch(
    tmp_path: Path, recording_sbatch, layout: list[str], nodes: str, gpus: str, message: str
) -> None:
    bin_dir, calls = recording_sbatch
    run_dir = tmp_path / "run"
    proc = sci_scale(
        "submit", *small_overrides(run_dir, tmp_path / "cache"), *layout,
        "--nodes", nodes, "--gpus-per-node", gpus, path_dir=bin_dir,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not calls.exists() and not run_dir.exists()


def test_submit_freezes_the_config_and_records_the_job(tmp_path: Path, recording_sbatch) -> None:
    bin_dir, calls = recording_sbatch
    run_dir = tmp_path / "run"
    proc = sci_scale(
        "submit", *small_overrides(run_dir, tmp_path / "cache"), "train.steps=7",
        "--nodes", "2", "--gpus-per-node", "0", path_dir=bin_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "submitted job 4242" in proc.stdout and f"run directory {run_dir}" in proc.stdout
    assert "train.sbatch" not in calls.read_text()  # the rendered copy is queued, not the template
    (script,) = (run_dir / "slurm").glob("train-*.sbatch")
    assert calls.read_text().split() == ["--parsable", str(script)]
    assert "#SBATCH --gpus-per-node" not in script.read_text()  # CPU nodes: no GPU request
    assert (run_dir / "slurm" / "job_ids").read_text() == "4242\n"
    status = sci_scale("status", str(run_dir), "--json")
    assert '"target_steps": 7' in status.stdout and '"step": 0' in status.stdout
    assert sci_scale("status", str(run_dir), "--finished").returncode == 3


def test_tasks_must_match_gpus(tmp_path: Path) -> None:
    proc = sci_scale(
        "submit", *small_overrides(tmp_path / "run", tmp_path / "cache"),
        "--gpus-per-node", "4", "--tasks-per-node", "2", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--tasks-per-node (2) must equal --gpus-per-node (4)" in proc.stderr


def test_status_of_a_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    proc = sci_scale("status", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert f"run directory {tmp_path / 'nowhere'} does not exist" in proc.stderr
