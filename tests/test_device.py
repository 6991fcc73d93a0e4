"""Device and implementation choice: clear errors instead of silent CPU runs, mixed precision,
and initial weights that do not depend on the layout."""

from __future__ import annotations

import math

import pytest
import torch
from launchers import REPO
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from sci_scale.config import ConfigError, load_config
from sci_scale.model import init as model_init
from sci_scale.runtime.device import DeviceError, autocast_dtype, resolve_device
from sci_scale.train.trainer import train


def test_cuda_requested_without_a_gpu_is_an_error() -> None:
    assert not torch.cuda.is_available()
    with pytest.raises(DeviceError, match=r"runtime.device=cuda but CUDA is unavailable"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_more_local_ranks_than_gpus_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(DeviceError, match="4 processes on this node but 2 visible GPU"):
        resolve_device("auto", local_rank=3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    with pytest.raises(DeviceError, match="8 processes on this node but 2"):
        resolve_device("cuda", local_rank=0)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)


def test_cli_refuses_cuda_on_a_cpu_machine(tmp_path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "sci_scale", "train", "runtime.device=cuda",
         f"run.dir={tmp_path}", "logging.wandb_mode=disabled"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "runtime.device=cuda but CUDA is unavailable" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.sequence_parallel=true"], r"needs parallel.tensor > 1"),
        (
            [
                "parallel.sequence_parallel=true",
                "parallel.tensor=2",
                "model.transformer_impl=local",
            ],
            r"local RMSNorm does not support sequence parallelism",
        ),
        (["model.fp8=delayed", "model.transformer_impl=local"], r"FP8 matmuls come from"),
        (["runtime.device=cpu", "model.attention_backend=flash"], r"flash and fused attention"),
        (["runtime.device=cpu", "model.transformer_impl=transformer_engine"], r"GPUs only"),
        (
            ["model.transformer_impl=transformer_engine", "model.attention_backend=local"],
            r"attention_backend=local is megatron's own",
        ),
        (["runtime.device=tpu"], r"runtime.device: 'tpu' is not one of the valid choices"),
        (["model.attention_backend=sdpa"], r"valid choices: auto, flash, fused, unfused, local"),
    ],
)
def test_impossible_implementation_choices(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.attention_backend=fused"], r"attention_backend=fused is a GPU kernel"),
        (["model.transformer_impl=transformer_engine"], r"Transformer Engine cannot be used"),
        (["model.params_dtype=bf16"], r"no fp32 master copy"),
        (["model.compute_dtype=bf16"], r"autocast in their backward for CUDA only"),
    ],
)
def test_choices_this_machine_cannot_serve_fail_at_start(
    make_config, overrides: list[str], message: str
) -> None:
    """Valid in a config (a GPU node could run them), refused when this CPU run starts."""
    from sci_scale.runtime.distributed import destroy_distributed

    cfg = make_config("train.steps=1", *overrides)
    try:
        with pytest.raises(ConfigError, match=message):
            train(cfg)
    finally:
        destroy_distributed()


def test_sequence_parallel_needs_transformer_engine() -> None:
    from sci_scale.model.specs import resolve_implementation

    cfg = load_config(None, ["parallel.sequence_parallel=true", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match=r"sequence_parallel=true needs Transformer Engine"):
        resolve_implementation(cfg, torch.device("cpu"))


def test_compute_dtype_auto_is_bf16_on_cuda_fp32_on_cpu() -> None:
    assert autocast_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda", 0)) is None


def _shard(full_shape, offset, local_shape, key="w", prepend=0) -> ShardedTensor:
    data = torch.empty(local_shape)
    return ShardedTensor.from_rank_offsets(
        key, data, *[(axis, offset[axis] // local_shape[axis] if local_shape[axis] else 0,
                      full_shape[axis] // local_shape[axis]) for axis in range(len(local_shape))],
    )  # fmt: skip


@pytest.mark.parametrize("rows", [7, 64, 3000])
def test_shards_are_slices_of_one_global_draw(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """Row and column shards of a weight (TP column/row parallel) are exactly the slices of the
    whole weight's draw, also across generator blocks."""
    monkeypatch.setattr(model_init, "BLOCK_ROWS", 5)  # several blocks, one cut by the end
    shape = (rows - rows % 2, 64)
    whole = _shard(shape, (0, 0), shape)
    model_init.fill_global_normal(whole, seed=3, std=0.5)
    assert whole.data.std().item() == pytest.approx(0.5, rel=0.2)
    for axis in (0, 1):
        parts = []
        for rank in range(2):
            local = list(shape)
            local[axis] //= 2
            offset = [0, 0]
            offset[axis] = rank * local[axis]
            shard = _shard(shape, offset, local)
            model_init.fill_global_normal(shard, seed=3, std=0.5)
            parts.append(shard.data)
        assert torch.equal(torch.cat(parts, dim=axis), whole.data)
    # a taller tensor (a vocabulary padded for another TP size) starts with the same rows
    taller = _shard((shape[0] + 6, 64), (0, 0), (shape[0] + 6, 64))
    model_init.fill_global_normal(taller, seed=3, std=0.5)
    assert torch.equal(taller.data[: shape[0]], whole.data)
    other = _shard(shape, (0, 0), shape, key="v")
    model_init.fill_global_normal(other, seed=3, std=0.5)
    assert not torch.equal(other.data, whole.data)  # each weight has its own draw


def test_output_projections_get_the_scaled_init(make_config) -> None:
    from sci_scale.model.gpt import SCIGPTModel
    from sci_scale.runtime.distributed import destroy_distributed, init_distributed

    init_distributed()
    try:
        cfg = make_config("model.num_layers=8", "model.hidden_size=128")
        model = SCIGPTModel(cfg, vocab_size=512)
        layer = model.gpt.decoder.layers[0]
        std = cfg.model.init_method_std
        assert layer.self_attention.linear_qkv.weight.std().item() == pytest.approx(std, rel=0.1)
        scaled = std / math.sqrt(2 * cfg.model.num_layers)
        assert layer.mlp.linear_fc2.weight.std().item() == pytest.approx(scaled, rel=0.1)
    finally:
        destroy_distributed()
