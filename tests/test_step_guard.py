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
from sci_scale.checkpoint.safe_load import safe_torch_load
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


def _tensors_in(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _tensors_in(value, f"{prefix}/{key}", out)
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _tensors_in(value, f"{prefix}/{index}", out)


def saved_tensors(ckpt: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds: the model's weights (DCP, by name) and everything in
    the rank files and DeepSpeed's ZeRO states (optimizer moments, master weights)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "model", out)
    tensors = {k: v for k, v in torch.load(out, weights_only=True).items() if torch.is_tensor(v)}
    for state_file in [*ckpt.glob("rank_*.pt"), *ckpt.glob("deepspeed/**/*_states.pt")]:
        _tensors_in(safe_torch_load(state_file), state_file.name, tensors)
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
    compared = [n for n in two if n.startswith("gpt.") or "/optimizer/state/" in n]
    assert any("exp_avg_sq" in n for n in compared)  # AdamW's moments are among them
    for name in compared:
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


DEEPSPEED_RUN = """
import json, os, sys
from pathlib import Path


sys.path.insert(0, {tests!r})
from conftest import small_overrides

import sci_scale.train.trainer as trainer_module
from sci_scale.config import load_config

original = trainer_module.Trainer.train_step


def train_step(self):
    # a NaN in every gradient of one parameter at step 2, as autograd produces it (before
    # DeepSpeed's own hooks move the gradient into ZeRO's buffers)
    handle = None
    if self.step + 1 == 2:
        param = next(p for p in self.model.parameters() if p.requires_grad)
        handle = param.register_hook(lambda grad: grad * float("nan"))
    try:
        return original(self)
    finally:
        if handle is not None:
            handle.remove()


trainer_module.Trainer.train_step = train_step

if __name__ == "__main__":  # megatron's checkpoint writer starts a process that imports this
    overrides = small_overrides(Path({run_dir!r}), Path({cache!r}))
    cfg = load_config(None, [*overrides, "train.steps=4", "checkpoint.interval=1",
                             "checkpoint.keep_last=10", "parallel.zero_stage={stage}",
                             "train.micro_batch_size=4"])
    result = trainer_module.train(cfg)
    if os.environ.get("RANK", "0") == "0":  # the group is gone once train() returns
        print("RESULT" + json.dumps({{"skipped": result.skipped_steps, "step": result.step}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_skips_a_nan_gradient_and_leaves_the_weights_untouched(
    tmp_path: Path, data_cache: Path, stage: int
) -> None:
    """DP2 under ZeRO: the step with a NaN gradient is skipped on both ranks (DeepSpeed's step
    runs and is undone), its checkpoint equals the previous one, and training goes on."""
    from launchers import torchrun_script

    run_dir = tmp_path / "run"
    script = tmp_path / "run.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(
        DEEPSPEED_RUN.format(tests=tests, run_dir=str(run_dir), cache=str(data_cache), stage=stage)
    )
    result = torchrun_script(script, nproc=2, timeout_s=600)
    assert result == {"skipped": 1, "step": 4}
    records = {r["step"]: r for r in read_metrics(run_dir)}
    assert [records[s]["skipped"] for s in (1, 2, 3, 4)] == [
        None,
        "nonfinite_grad_norm",
        None,
        None,
    ]
    assert all(math.isfinite(records[s]["lm_loss"]) for s in (1, 2, 3, 4))
    root = run_dir / "checkpoints"
    one = saved_tensors(root / "step_0000001", tmp_path / "one")
    two = saved_tensors(root / "step_0000002", tmp_path / "two")
    three = saved_tensors(root / "step_0000003", tmp_path / "three")
    weights = [name for name in one if name.startswith("gpt.")]
    assert weights and all(torch.equal(one[n], two[n]) for n in weights)
    assert not all(torch.equal(two[n], three[n]) for n in weights)  # step 3 was applied
    assert_all_finite(run_dir, tmp_path / "finite")
