"""A ZeRO checkpoint holds the weights once: in ``model/`` (megatron's distributed checkpoint),
not again in DeepSpeed's ``model_states`` file; a resume still continues exactly (the DP2 ZeRO-1
and ZeRO-3 cases are in test_parallel.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_overrides
from launchers import REPO

from sci_scale.checkpoint.safe_load import safe_torch_load
from sci_scale.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sci_scale", "train", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_files_hold_no_copy_of_the_weights(
    tmp_path: Path, data_cache: Path, stage
) -> None:
    base = [*small_overrides(tmp_path / "run", data_cache), f"parallel.zero_stage={stage}"]
    cli(*base, "train.steps=3", "checkpoint.interval=2")  # one process, no launcher needed
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    (model_states,) = (ckpt / "deepspeed").rglob("*model_states.pt")
    assert safe_torch_load(model_states)["module"] == {}
    uninterrupted = read_metrics(tmp_path / "run")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(ckpt, resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    cli(*small_overrides(resumed, data_cache), f"parallel.zero_stage={stage}", "train.steps=3",
        "checkpoint.interval=2", "--resume")  # fmt: skip
    (step3,) = read_metrics(resumed)
    assert step3["lm_loss"] == uninterrupted[2]["lm_loss"]
    assert step3["grad_norm"] == uninterrupted[2]["grad_norm"]
