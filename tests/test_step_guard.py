"""Non-finite guards: a step whose loss or gradient norm is not finite is skipped before the
optimizer touches anything, too many in a row stop the run, and no checkpoint ever holds a NaN.

Faults are injected where they arise in a real run: a NaN placed in one gradient just before
the trainer computes the global norm (``clip_grad_norm``), and learning rates large enough to
blow the weights up.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import sci_scale.train.trainer as trainer_module
from sci_scale.checkpoint.index import CheckpointError, latest_checkpoint
from sci_scale.cli.main import main
from sci_scale.config import load_config
from sci_scale.train.guards import Skip, StepGuard, TrainingDiverged, check_finite_state
from sci_scale.train.metrics import read_metrics
from sci_scale.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def guard(*overrides: str, world_size: int = 1) -> StepGuard:
    return StepGuard(load_config(TINY, list(overrides)), world_size, is_main=True)


# -- the decision ------------------------------------------------------------------------
def test_a_non_finite_loss_or_norm_is_skipped_and_a_finite_one_applied() -> None:
    g = guard()
    assert g.decide(2.0, 1.0) is None
    assert g.decide(math.nan, 1.0).reason == "nonfinite_loss"
    assert g.decide(2.0, math.inf).reason == "nonfinite_grad_norm"
    assert g.decide(math.inf, math.nan).reason == "nonfinite_loss"


def test_consecutive_skips_stop_the_run_and_an_applied_step_resets_the_count() -> None:
    g = guard("train.max_consecutive_skips=3")
    nan = Skip("nonfinite_grad_norm", math.nan)
    for step in (1, 2):
        g.record(step, nan, 2.0)
        g.stop_if_diverged()
    g.record(3, None, 2.0)  # an applied step
    for step in (4, 5):
        g.record(step, nan, 2.0)
        g.stop_if_diverged()
    g.record(6, nan, 2.0)
    with pytest.raises(TrainingDiverged, match="3 steps in a row skipped") as info:
        g.stop_if_diverged()
    assert "the last at step 6" in str(info.value) and "before step 4" in str(info.value)
    assert g.total == 5


def test_the_spike_policy_skips_above_k_times_the_running_median() -> None:
    g = guard("train.loss_spike_factor=3", "train.loss_spike_window=4")
    g.record(1, None, 2.0)
    assert g.decide(100.0, 1.0) is None  # the window is not half full yet: no policy
    g.record(2, None, 2.0)
    assert g.decide(6.5, 1.0).reason == "loss_spike"
    assert g.decide(5.9, 1.0) is None
    g.record(3, g.decide(6.5, 1.0), 6.5)  # a skipped step's loss stays out of the window
    assert list(g.window) == [2.0, 2.0]
    assert guard().decide(1e9, 1.0) is None  # off by default


# -- nothing non-finite is saved ------------------------------------------------------------
def test_a_non_finite_weight_or_moment_is_never_saved() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    check_finite_state(model, optimizer, 1, world_size=1)
    optimizer.state[model.bias]["exp_avg_sq"][0] = math.inf
    with pytest.raises(CheckpointError, match="refusing to save the checkpoint of step 1: "):
        check_finite_state(model, optimizer, 1, world_size=1)
    optimizer.state[model.bias]["exp_avg_sq"][0] = 0.0
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(CheckpointError, match="'weight' holds NaN or infinite values"):
        check_finite_state(model, optimizer, 1, world_size=1)


def saved_tensors(ckpt: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds: model weights (DCP) and optimizer state (rank files)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "model", out)
    tensors = {k: v for k, v in torch.load(out, weights_only=True).items() if torch.is_tensor(v)}
    for rank_file in ckpt.glob("rank_*.pt"):
        state = torch.load(rank_file, weights_only=True)["optimizer"]["state"]
        for index, moments in state.items():
            for key, value in moments.items():
                if torch.is_tensor(value):
                    tensors[f"{rank_file.name}/{index}/{key}"] = value
    return tensors


def assert_all_finite(run_dir: Path, tmp_path: Path) -> list[Path]:
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    for ckpt in saved:
        for name, tensor in saved_tensors(ckpt, tmp_path).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{ckpt.name}: {name}"
    return saved


@pytest.fixture
def nan_gradient_at(monkeypatch: pytest.MonkeyPatch):
    """Put a NaN into the first gradient at the given optimizer steps (1-based)."""

    def inject(*steps: int) -> None:
        calls = {"n": 0}
        clip = trainer_module.clip_grad_norm

        def poisoned(params, max_norm):
            calls["n"] += 1
            if calls["n"] in steps or (steps and steps[-1] == -1 and calls["n"] >= steps[0]):
                params[0].grad.view(-1)[0] = math.nan
            return clip(params, max_norm)

        monkeypatch.setattr(trainer_module, "clip_grad_norm", poisoned)

    return inject


def test_an_injected_nan_gradient_is_skipped_and_the_run_continues(
    make_config, nan_gradient_at, tmp_path
) -> None:
    run = ("train.steps=5", "checkpoint.interval=1", "checkpoint.keep_last=10")
    reference = train(make_config(*run, run_dir=tmp_path / "reference"))
    nan_gradient_at(3)
    result = train(make_config(*run, run_dir=tmp_path / "faulty"))
    assert result.finished and result.step == 5 and result.skipped_steps == 1
    records = {r["step"]: r for r in read_metrics(tmp_path / "faulty")}
    assert records[3]["skipped"] == "nonfinite_grad_norm"
    assert records[3]["grad_norm"] is None  # NaN, written as null
    assert all(records[s]["skipped"] is None for s in (1, 2, 4, 5))
    assert all(math.isfinite(records[s]["lm_loss"]) for s in records)
    # Steps 1-3 saw the same data: identical losses; the model after step 3 is that of step 2.
    ref = {r["step"]: r for r in reference.history}
    assert [records[s]["lm_loss"] for s in (1, 2, 3)] == [ref[s]["lm_loss"] for s in (1, 2, 3)]
    two, three = (
        saved_tensors(tmp_path / "faulty" / "checkpoints" / f"step_000000{s}", tmp_path / f"t{s}")
        for s in (2, 3)
    )
    for name in two:
        if name.startswith("gpt.") or name.startswith("rank_"):
            assert torch.equal(two[name], three[name]), name
    assert records[4]["lm_loss"] != ref[4]["lm_loss"]  # training went on from step 2's model
    assert len(assert_all_finite(tmp_path / "faulty", tmp_path)) == 5


def test_n_skips_in_a_row_stop_the_run_with_one_line(
    make_config, nan_gradient_at, tmp_path, capsys
) -> None:
    from conftest import small_overrides

    nan_gradient_at(2, -1)  # every step from step 2 on
    run_dir = tmp_path / "run"
    argv = ["train", *small_overrides(run_dir, tmp_path / "cache"), "train.steps=8"]
    argv += ["checkpoint.interval=1", "checkpoint.keep_last=10", "train.max_consecutive_skips=3"]
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "training diverged: 3 steps in a row skipped (train.max_consecutive_skips=3)" in lines[0]
    assert "the last at step 4" in lines[0]
    assert [r["skipped"] for r in read_metrics(run_dir)] == [None, *["nonfinite_grad_norm"] * 3]
    assert_all_finite(run_dir, tmp_path)


def test_a_learning_rate_that_blows_up_the_weights_saves_nothing_non_finite(
    tmp_path, capsys
) -> None:
    """With a huge (finite) learning rate the first update makes the weights non-finite while
    its own loss was finite: the next steps are skipped, nothing non-finite is written, and
    ``latest`` keeps naming the last finite checkpoint."""
    from conftest import small_overrides

    run_dir = tmp_path / "run"
    argv = ["train", *small_overrides(run_dir, tmp_path / "cache"), "train.steps=8"]
    argv += ["checkpoint.interval=1", "checkpoint.keep_last=10", "checkpoint.save_initial=true"]
    argv += ["train.lr=1e30", "train.min_lr=0", "train.warmup_steps=0", "train.clip_grad=0"]
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    saved = assert_all_finite(run_dir, tmp_path)
    assert latest_checkpoint(run_dir / "checkpoints") == saved[-1]
