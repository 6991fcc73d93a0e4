"""Parallel layouts reproduce the single-process run: TP, PP, DP under ZeRO 1/2/3, combinations.

Every layout starts from the same seed and no checkpoint: initial weights are drawn from each
weight's global identity (``sci_scale.model.init``), so every layout starts from the same
weights, reads the same global batches, and its per-step LM loss and SCL must equal the
reference's. Multi-process runs go through torchrun on CPU with gloo, each in its own process
group with a timeout, killed on expiry, and under the collective checker
(``SCI_SCALE_CHECK_COLLECTIVES=1``): a tensor made without an explicit device that reaches a
collective (the NCCL failure of a GPU run) fails the run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import small_overrides
from launchers import failure_summary, torchrun

from sci_scale.config import ConfigError, load_config
from sci_scale.runtime.collective_check import ENV_VAR as COLLECTIVE_CHECK
from sci_scale.train.metrics import read_metrics
from sci_scale.train.trainer import train

RTOL = 1e-5
STEPS = 5
CHECKED = {COLLECTIVE_CHECK: "1"}

# The reference: 4 layers (so that PP=2 keeps sci.fuse_layer=1 on the first stage), micro-batch 4,
# two micro-batches per step, a quarter of the blocks pair blocks, clipping active. The learning
# rate is the tiny config's / 10: at 2e-3 with a 2-step warm-up, Adam turns last-bit differences
# of reduction order (summing tensor-parallel partial products, a tied embedding's two
# gradients) into 1e-4 differences within five steps (its update g / (|g| + eps) is O(lr) even
# for gradients at rounding level); the comparison is of the implementations, not of that chaos.
PARALLEL = [
    "train.lr=2e-4",
    "train.min_lr=2e-5",
    "model.num_layers=4",
    f"train.steps={STEPS}",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.eval_interval=1000",
    "train.clip_grad=0.5",
    "checkpoint.keep_last=0",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single-process run: the trajectory every layout must reproduce from the seed."""
    root = tmp_path_factory.mktemp("parallel")
    cache = root / "cache"
    run_dir = root / "reference"
    train(load_config(None, [*small_overrides(run_dir, cache), *PARALLEL]))
    records = read_metrics(run_dir)
    assert any(r["scl_loss"] is not None for r in records)  # pair blocks are present
    return {"root": root, "cache": cache, "records": records}


def layout_overrides(reference: dict, name: str, *layout: str) -> list[str]:
    run_dir = reference["root"] / name
    return [*small_overrides(run_dir, reference["cache"]), *PARALLEL, *layout]


def assert_same_trajectory(records: list[dict], expected: list[dict], steps=None) -> None:
    steps = steps or [r["step"] for r in expected]
    got = {r["step"]: r for r in records}
    want = {r["step"]: r for r in expected}
    for step in steps:
        for key in ("lm_loss", "scl_loss"):
            a, b = got[step][key], want[step][key]
            if b is None:
                assert a is None, (step, key)
            else:
                assert a == pytest.approx(b, rel=RTOL), (step, key, a, b)


LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2_zero0": (2, ["parallel.zero_stage=0", "train.micro_batch_size=2"]),
    "dp2_zero1": (2, ["parallel.zero_stage=1", "train.micro_batch_size=2"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2", "train.micro_batch_size=2"]),
    "dp2_zero3": (2, ["parallel.zero_stage=3", "train.micro_batch_size=2"]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "tp2_dp2_zero1": (
        4,
        ["parallel.tensor=2", "parallel.zero_stage=1", "train.micro_batch_size=2"],
    ),
    "pp2_dp2_zero1": (
        4,
        ["parallel.pipeline=2", "parallel.zero_stage=1", "train.micro_batch_size=2"],
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.slow
def test_layout_matches_single_process(reference: dict, name: str) -> None:
    nproc, layout = LAYOUTS[name]
    overrides = layout_overrides(reference, name, *layout)
    proc = torchrun(nproc, overrides, env=CHECKED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "layout: TP" in proc.stdout
    records = read_metrics(reference["root"] / name)
    assert_same_trajectory(records, reference["records"])
    # ZeRO shards what its stage says, as the tensors held by rank 0 show.
    ours, single = records[0], reference["records"][0]
    if "parallel.zero_stage=1" in layout and nproc == 2:
        assert ours["mem_optimizer_mb"] < 0.8 * single["mem_optimizer_mb"]
    if "parallel.zero_stage=3" in layout:
        assert ours["mem_params_mb"] == pytest.approx(single["mem_params_mb"] / 2, rel=0.05)


@pytest.mark.slow
def test_grad_accumulation_matches_one_large_micro_batch(make_config, tmp_path: Path) -> None:
    """4 x micro-batch 1 == 1 x micro-batch 4 for the LM loss. The SCL is contrastive over the
    examples of one micro-batch (x data-parallel ranks), so splitting a micro-batch changes its
    negatives by definition; alpha=0 keeps it out of the weights and the LM comparison exact."""
    common = ("train.steps=4", "train.global_batch_size=4", "sci.alpha=0", "train.clip_grad=0.5")
    whole = train(make_config(*common, "train.micro_batch_size=4", run_dir=tmp_path / "mb4"))
    split = train(make_config(*common, "train.micro_batch_size=1", run_dir=tmp_path / "mb1"))
    for a, b in zip(split.history, whole.history, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_resume_at_another_layout(reference: dict, tmp_path: Path) -> None:
    """Saved at TP2 x PP2, resumed at TP1 x PP1: the next step's loss is the uninterrupted one."""
    name = "tp2_pp2_saving"
    overrides = layout_overrides(
        reference, name, "parallel.tensor=2", "parallel.pipeline=2", "checkpoint.interval=3"
    )
    proc = torchrun(4, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uninterrupted = read_metrics(reference["root"] / name)

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    saved = reference["root"] / name / "checkpoints" / "step_0000003"
    shutil.copytree(saved, resumed_dir / "checkpoints" / "step_0000003")
    (resumed_dir / "checkpoints" / "latest").write_text("step_0000003\n")
    cfg = load_config(
        None, [*small_overrides(resumed_dir, reference["cache"]), *PARALLEL, "train.steps=4"]
    )
    result = train(cfg, resume=True)
    assert [r["step"] for r in result.history] == [4]
    assert_same_trajectory(result.history, uninterrupted, steps=[4])


def test_zero2_with_pipeline_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\(ZeRO-2/3\) only without pipeline"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=2"])


def test_tensor_parallel_must_divide_heads() -> None:
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) must be divisible by"):
        load_config(None, ["parallel.tensor=3", "model.num_query_groups=1"])


@pytest.mark.slow
def test_world_size_not_divisible_fails_fast(reference: dict) -> None:
    proc = torchrun(3, layout_overrides(reference, "bad_world", "parallel.tensor=2"))
    assert proc.returncode != 0
    assert "parallel layout does not fit" in proc.stderr
    assert "must divide the world size (3)" in proc.stderr


@pytest.mark.slow
def test_interleaved_pipeline_matches_single_process(reference: dict, tmp_path: Path) -> None:
    """PP2 with two virtual stages per rank (interleaved 1F1B): one layer per model chunk, so
    the fusion sits before the first layer (sci.fuse_layer=0) in both runs."""
    single_dir = reference["root"] / "single_fuse0"
    base = [*small_overrides(single_dir, reference["cache"]), *PARALLEL, "sci.fuse_layer=0"]
    train(load_config(None, base))
    expected = read_metrics(single_dir)
    overrides = [
        *small_overrides(reference["root"] / "pp2_vp2", reference["cache"]),
        *PARALLEL,
        "sci.fuse_layer=0",
        "parallel.pipeline=2",
        "parallel.virtual_pipeline=2",
    ]
    proc = torchrun(2, overrides, env=CHECKED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interleaved, 2 chunks per stage" in proc.stdout
    assert_same_trajectory(read_metrics(reference["root"] / "pp2_vp2"), expected)
    # its checkpoint (one sharded state per chunk) loads into a single process
    saved = reference["root"] / "pp2_vp2" / "checkpoints" / "step_0000005"
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(saved, resumed_dir / "checkpoints" / "step_0000005")
    (resumed_dir / "checkpoints" / "latest").write_text("step_0000005\n")
    resume_overrides = [*small_overrides(resumed_dir, reference["cache"]), *PARALLEL]
    cfg = load_config(None, [*resume_overrides, "sci.fuse_layer=0", "train.steps=6"])
    result = train(cfg, resume=True)
    assert [r["step"] for r in result.history] == [6]


def test_virtual_pipeline_needs_zero_stage_0() -> None:
    with pytest.raises(ConfigError, match="DeepSpeed wraps one model"):
        load_config(
            None,
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.zero_stage=1"],
        )


@pytest.mark.parametrize("zero_stage", [1, 3])
@pytest.mark.slow
def test_exact_resume_at_the_same_layout(reference: dict, tmp_path: Path, zero_stage: int) -> None:
    """DP2 under ZeRO: stopped after step 3 and resumed (DeepSpeed's partitioned optimizer state,
    every rank's RNG), steps 4-5 equal the uninterrupted run's exactly."""
    name = f"dp2_zero{zero_stage}_saving"
    layout = (f"parallel.zero_stage={zero_stage}", "train.micro_batch_size=2")
    overrides = layout_overrides(reference, name, *layout, "checkpoint.interval=3")
    proc = torchrun(2, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uninterrupted = read_metrics(reference["root"] / name)

    resumed_dir = tmp_path / "resumed"
    saved = reference["root"] / name / "checkpoints" / "step_0000003"
    shutil.copytree(saved, resumed_dir / "checkpoints" / "step_0000003")
    (resumed_dir / "checkpoints" / "latest").write_text("step_0000003\n")
    resume = [*small_overrides(resumed_dir, reference["cache"]), *PARALLEL, *layout]
    proc = torchrun(2, resume, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optimizer state reinitialised" not in proc.stdout + proc.stderr
    resumed = read_metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [4, 5]
    for record in resumed:
        want = {r["step"]: r for r in uninterrupted}[record["step"]]
        assert record["lm_loss"] == want["lm_loss"]
        assert record["scl_loss"] == want["scl_loss"]


@pytest.mark.slow
def test_two_processes_build_an_empty_data_cache(tmp_path: Path) -> None:
    """Rank 0 builds tokenizer, corpus and every index first; rank 1 reads them afterwards."""
    run_dir = tmp_path / "fresh"
    proc = torchrun(2, [*small_overrides(run_dir, tmp_path / "empty-cache"), "train.steps=2"])
    assert proc.returncode == 0, failure_summary(proc)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
