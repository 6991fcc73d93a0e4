"""The GPU path on a real GPU (run by tools/gpu_check.sh; skipped without CUDA).

What the CPU suite proves by construction (devices, collectives, per-example attention) is
checked here on the device it was built for: everything sits on the GPU, bf16 compute tracks
fp32, the SCI branch's per-example attention equals the dense mask on CUDA, and the flash kernel
really serves both the backbone's and the SCI branch's attention (SDPA restricted to flash
raises when it cannot); a Hugging Face conversion works where CUDA is visible.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_train(make_config, tmp_path):
    from sci_scale.runtime.distributed import destroy_distributed
    from sci_scale.train.trainer import train

    def run(*overrides: str, name: str = "run"):
        return train(make_config("runtime.device=cuda", *overrides, run_dir=tmp_path / name))

    yield run
    destroy_distributed()


def test_everything_sits_on_the_gpu(make_config) -> None:
    from sci_scale.runtime.distributed import destroy_distributed
    from sci_scale.train.trainer import Trainer

    trainer = Trainer(make_config("train.steps=2", "runtime.device=cuda"))
    try:
        trainer.setup()
        assert trainer.env.backend == "nccl"
        record = trainer.train_step()
        for name, tensor in [*trainer.model.named_parameters(), *trainer.model.named_buffers()]:
            assert tensor.device.type == "cuda", name
        assert torch.isfinite(torch.tensor(record["lm_loss"]))
        assert "eval_lm_loss" in trainer.evaluate()
    finally:
        destroy_distributed()


def test_bf16_compute_tracks_fp32(cuda_train) -> None:
    fp32 = cuda_train("train.steps=3", "model.compute_dtype=fp32", name="fp32")
    bf16 = cuda_train("train.steps=3", "model.compute_dtype=bf16", name="bf16")
    for a, b in zip(bf16.history, fp32.history, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-2)


def test_flash_serves_backbone_and_sci_attention(cuda_train) -> None:
    """SDPA restricted to the flash kernel raises when a mask or dtype rules flash out."""
    result = cuda_train(
        "train.steps=2",
        "model.attention_backend=flash",
        "model.transformer_impl=local",
        "data.pair_rate=0.5",  # pair blocks in every step: the per-example path runs too
    )
    assert all(math.isfinite(r["lm_loss"]) for r in result.history)
    assert all(r["pair_blocks"] > 0 and r["scl_loss"] is not None for r in result.history)


def test_zero1_on_one_gpu(cuda_train) -> None:
    result = cuda_train("train.steps=2", "parallel.zero_stage=1")
    assert len(result.history) == 2


def test_sci_attention_equals_dense_mask_on_cuda() -> None:
    from test_sci_attention import SMALL, batches, max_difference

    from sci_scale.config import load_config
    from sci_scale.model.gpt import SCIGPTModel
    from sci_scale.runtime.distributed import (
        destroy_distributed,
        init_distributed,
        seed_everything,
    )

    init_distributed(device="cuda")
    try:
        seed_everything(0)
        cfg = load_config(None, [*SMALL, "model.compute_dtype=fp32", "runtime.device=cuda"])
        branch = SCIGPTModel(cfg, vocab_size=256).sci
        assert branch.proj_in.weight.device.type == "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False
        for kind, ids in batches(128).items():
            assert max_difference(branch, ids) <= 1e-4, kind
    finally:
        destroy_distributed()


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None,
    reason="Transformer Engine is not installed (its wheel does not fit the GPU bundle)",
)
def test_transformer_engine_path(cuda_train) -> None:
    result = cuda_train("train.steps=2", "model.transformer_impl=transformer_engine")
    assert len(result.history) == 2


def test_conversion_round_trip_where_cuda_is_visible(tmp_path) -> None:
    """Import, logits check and export on a GPU node (the process group on NCCL, the model on
    the GPU): transformers' logits, and every tensor back bit for bit."""
    from hf_models import build_hf_model
    from safetensors.torch import load_file

    from sci_scale.convert import hf

    src = build_hf_model("qwen3", tmp_path / "hf")
    ckpt = hf.hf_to_sci(src, tmp_path / "ckpt", tp=1)
    diff = hf.verify(ckpt, src)
    assert diff is not None and diff <= 1e-4, diff
    out = hf.sci_to_hf(ckpt, tmp_path / "out", dtype="keep", max_shard_size="20KB")
    original = load_file(src / "model.safetensors")
    exported = {}
    for path in out.glob("model-*.safetensors"):
        exported.update(load_file(path))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
