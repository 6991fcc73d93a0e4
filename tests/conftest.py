"""Shared fixtures: a small, fast configuration and a data cache shared by the whole session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sci_scale.config import Config, load_config


def small_overrides(run_dir: Path, cache_dir: Path) -> list[str]:
    """A model and data small enough for a test to train in seconds on 2 cores."""
    return [
        f"run.dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=128",
        "sci.hidden_size=32",
        "sci.num_layers=1",
        "sci.embed_dim=16",
        "data.max_docs=400",
        "data.tokenizer_vocab_size=512",
        "data.arithmetic_per_template=8",
        "data.pair_rate=0.25",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.warmup_steps=2",
        "train.log_interval=5",
        "train.eval_interval=10",
        "train.eval_batches=2",
        "checkpoint.interval=1000",
        "logging.wandb_mode=disabled",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu`` where torch sees no CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tools/gpu_check.sh runs these)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer, indexed corpus and dataset indices, keyed by their inputs, built once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def make_config(tmp_path: Path, data_cache: Path):
    def make(*overrides: str, run_dir: Path | None = None) -> Config:
        base = small_overrides(run_dir or tmp_path / "run", data_cache)
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture(autouse=True)
def _restore_logging():
    """Quiet megatron's INFO logs; undo the CLI's ``basicConfig(force=True)`` after each test."""
    root, megatron = logging.getLogger(), logging.getLogger("megatron")
    handlers, level = root.handlers[:], root.level
    megatron.setLevel(logging.WARNING)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    megatron.setLevel(logging.WARNING)


@pytest.fixture
def recording_sbatch(tmp_path: Path) -> tuple[Path, Path]:
    """A fake ``sbatch`` that records its calls and answers with a job id."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho 4242\n')
    fake.chmod(0o755)
    return bin_dir, calls
