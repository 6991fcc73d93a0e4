"""The training loop: exact resume, crash-safe checkpoints, and the default job end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sci_scale.checkpoint import manager as ckpt
from sci_scale.checkpoint.index import CheckpointError, latest_checkpoint
from sci_scale.config import ConfigError
from sci_scale.launch.status import read_status
from sci_scale.train.metrics import read_metrics
from sci_scale.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("lm_loss", "scl_loss", "grad_norm", "pos_cos", "neg_cos", "pair_blocks", "lr")


def same(a: object, b: object) -> bool:
    """Exact equality, with NaN equal to NaN (a cosine no micro-batch could measure)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def by_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records}


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(make_config, tmp_path: Path) -> None:
    steps = ("train.steps=20", "train.eval_interval=10")
    straight = train(make_config(*steps, run_dir=tmp_path / "straight"))
    assert straight.step == 20

    resumed_dir = tmp_path / "resumed"
    first = train(make_config(*steps, run_dir=resumed_dir), max_steps=10)
    assert first.step == 10
    assert latest_checkpoint(resumed_dir / "checkpoints").name == "step_0000010"
    second = train(make_config(*steps, run_dir=resumed_dir), resume=True)
    assert second.step == 20
    assert [r["step"] for r in second.history] == list(range(11, 21))

    expected = by_step(straight.history)
    assert any(expected[s]["scl_loss"] is not None for s in range(11, 21))  # SCL is exercised
    for record in second.history:
        for key in COMPARED:
            assert same(record.get(key), expected[record["step"]].get(key)), (record["step"], key)
    assert second.history[-1]["eval_lm_loss"] == expected[20]["eval_lm_loss"]
    # metrics.jsonl of the resumed run reads as one run
    assert [r["step"] for r in read_metrics(resumed_dir)] == list(range(1, 21))


@pytest.mark.slow
def test_crash_during_save_leaves_previous_checkpoint_loadable(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    overrides = ("train.steps=10", "checkpoint.interval=5")
    real_save = ckpt.dist_checkpointing.save
    calls = []

    def crashing_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        calls.append(checkpoint_dir)
        real_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if len(calls) == 2:  # the step-10 save: weights written, rank files and run state not
            raise RuntimeError("injected crash while writing a checkpoint")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", crashing_save)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_config(*overrides, run_dir=run_dir))
    monkeypatch.undo()

    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000005"
    assert list(root.glob(".tmp-step_0000010"))  # the partial write is there, and ignored
    assert not (root / "step_0000010").exists()
    uninterrupted = by_step(read_metrics(run_dir))

    # The previous checkpoint loads and continues exactly where the crashed run went.
    resumed = train(make_config(*overrides, run_dir=run_dir), resume=True)
    assert [r["step"] for r in resumed.history] == [6, 7, 8, 9, 10]
    for record in resumed.history:
        assert record["lm_loss"] == uninterrupted[record["step"]]["lm_loss"]
    assert latest_checkpoint(root).name == "step_0000010"
    assert not list(root.glob(".tmp-*"))  # the next save cleaned up the partial one


def test_checkpoint_holds_run_state_and_loads_safely(make_config, tmp_path: Path) -> None:
    result = train(make_config("train.steps=3", run_dir=tmp_path / "run"))
    path = result.checkpoint
    assert path is not None and path.name == "step_0000003"
    state = torch.load(path / "run_state.pt", weights_only=True)
    assert state["step"] == 3
    assert state["consumed_samples"] == 3 * 8
    assert state["config"]["train"]["steps"] == 3
    assert len(state["tokenizer"]["sha256"]) == 64
    rank = torch.load(path / "rank_00000.pt", weights_only=True)
    assert set(rank) == {"optimizer", "rng"}
    assert (path / "model" / "metadata.json").exists()


def test_resume_without_checkpoint_is_a_clear_error(make_config, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(make_config("train.steps=2", run_dir=tmp_path / "empty"), resume=True)


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path: Path) -> None:
    """``sci-scale train`` on configs/tiny.yaml as shipped (only the run directory moved)."""
    run_dir = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "sci_scale", "train", f"run.dir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 300/300" in proc.stdout and "ETA" in proc.stdout and "tok/s" in proc.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 301))
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert any(r["scl_loss"] is not None for r in records)
    assert records[-1]["eval_lm_loss"] < records[99]["eval_lm_loss"]
    pair_share = sum(r["pair_blocks"] for r in records) / sum(r["blocks"] for r in records)
    assert abs(pair_share - 0.05) < 0.02
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000300"
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert list((run_dir / "wandb").glob("offline-run-*"))  # wandb, offline by default


@pytest.mark.parametrize(
    ("mode", "fuse_layer"), [("selective", 1), ("full", 0)], ids=["selective", "full"]
)
@pytest.mark.slow
def test_activation_recomputation_changes_nothing_but_memory(
    make_config, tmp_path: Path, mode: str, fuse_layer: int
) -> None:
    common = ("train.steps=3", "model.num_layers=4", f"sci.fuse_layer={fuse_layer}")
    plain = train(make_config(*common, run_dir=tmp_path / "plain"))
    recomputed = train(make_config(*common, f"model.recompute={mode}", run_dir=tmp_path / mode))
    assert any(r["scl_loss"] is not None for r in plain.history)
    for a, b in zip(recomputed.history, plain.history, strict=True):
        assert a["lm_loss"] == b["lm_loss"]
        assert a["grad_norm"] == b["grad_norm"]
        assert a.get("scl_loss") == b.get("scl_loss")


def test_full_recomputation_needs_the_fusion_before_the_block(make_config) -> None:
    with pytest.raises(ConfigError, match=r"model\.recompute=full with sci\.fuse_layer=1"):
        make_config("model.recompute=full", "sci.fuse_layer=1")


@pytest.mark.slow
def test_wall_clock_limit_stops_with_a_checkpoint_and_auto_resume_continues(
    make_config, tmp_path: Path
) -> None:
    steps = ("train.steps=6",)
    straight = train(make_config(*steps, run_dir=tmp_path / "straight"))

    run_dir = tmp_path / "limited"
    # A limit of 6 ms is over after the first step: the run saves and stops there.
    first = train(make_config(*steps, "train.max_wall_minutes=1e-4", run_dir=run_dir), "auto")
    assert first.step == 1 and not first.finished
    assert "train.max_wall_minutes" in (first.stop_reason or "")
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000001"
    status = read_status(run_dir, query_slurm=False)
    assert (status.step, status.target_steps, status.finished) == (1, 6, False)

    second = train(make_config(*steps, run_dir=run_dir), "auto")  # finds the checkpoint
    assert second.finished and [r["step"] for r in second.history] == [2, 3, 4, 5, 6]
    expected = by_step(straight.history)
    for record in second.history:
        for key in COMPARED:
            assert same(record.get(key), expected[record["step"]].get(key)), (record["step"], key)
    assert read_status(run_dir, query_slurm=False).finished


def test_auto_resume_starts_fresh_without_a_checkpoint(make_config, tmp_path: Path) -> None:
    result = train(make_config("train.steps=2", run_dir=tmp_path / "fresh"), "auto")
    assert result.finished and [r["step"] for r in result.history] == [1, 2]


def test_signal_during_training_saves_and_stops(make_config, tmp_path: Path) -> None:
    """SIGUSR1 (Slurm's warning before a time limit) lands mid-step; the step completes."""
    from sci_scale.train import trainer as trainer_module

    run_dir = tmp_path / "signalled"
    trainer = trainer_module.Trainer(make_config("train.steps=8", run_dir=run_dir))
    real_step = trainer.train_step

    def step_then_signal() -> dict:
        record = real_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return record

    trainer.train_step = step_then_signal
    result = trainer.run()
    assert result.step == 3 and result.stop_reason == "signal SIGUSR1"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000003"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored afterwards
