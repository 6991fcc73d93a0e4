"""A checkpoint's whole model in one process, for inference: evaluation, export, comparisons.

Whatever layout a checkpoint was trained at, megatron reshards it on load, so one process at
TP=PP=1 can hold the whole model. The config and tokenizer come from the checkpoint itself
(its run state), so nothing about the run that wrote it needs to be known here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sci_scale.checkpoint.index import CheckpointError
from sci_scale.checkpoint.manager import load_weights
from sci_scale.checkpoint.manifest import require_intact
from sci_scale.checkpoint.state import RunState, read_run_state
from sci_scale.config import Config, config_from_dict
from sci_scale.data.tokenizer import load_tokenizer
from sci_scale.model.gpt import SCIGPTModel
from sci_scale.runtime.distributed import destroy_distributed, init_distributed, seed_everything


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """A one-rank process group (TP=PP=1) for the duration, unless one exists already."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        init_distributed(1, 1, 1)
        seed_everything(0)  # megatron's model-parallel RNG tracker must exist
    try:
        yield
    finally:
        if owned:
            destroy_distributed()


def inference_config(cfg: Config, tensor: int, pipeline: int) -> Config:
    """The same model at a TP x PP layout without ZeRO, computing in fp32: checkpoints reshard
    to any layout, and comparisons against transformers are made in fp32."""
    return cfg.replace(
        parallel=cfg.parallel.replace(
            tensor=tensor,
            pipeline=pipeline,
            virtual_pipeline=1,
            zero_stage=0,
            sequence_parallel=False,
        ),
        model=cfg.model.replace(compute_dtype="fp32"),
    )


def whole_model_config(cfg: Config) -> Config:
    """The model in one process (TP=PP=1): how conversions and evaluation hold it."""
    return inference_config(cfg, 1, 1)


def checkpoint_config(ckpt: Path) -> tuple[Config, RunState]:
    """What a checkpoint holds, once it matches its manifest: every path that loads a single
    checkpoint (evaluation, export, the logits check) starts here."""
    require_intact(ckpt)
    state = read_run_state(ckpt)
    return config_from_dict(state.config), state


def tokenizer_source(cfg: Config, state: RunState) -> Path | None:
    """Where the checkpoint's tokenizer lives: an HF directory or a sentencepiece model."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    path = state.tokenizer.get("path")
    return Path(path) if path else None


def checkpoint_tokenizer(cfg: Config, state: RunState) -> Any:
    source = tokenizer_source(cfg, state)
    if source is None or not source.exists():
        raise CheckpointError(f"the checkpoint's tokenizer {source} is gone")
    return load_tokenizer(source)


def vocab_rows(cfg: Config, state: RunState) -> int:
    """Embedding rows without padding: the config's, else the tokenizer's vocabulary."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    return checkpoint_tokenizer(cfg, state).vocab_size


@dataclass
class LoadedCheckpoint:
    model: SCIGPTModel
    cfg: Config
    state: RunState
    rows: int  # embedding rows without padding


def load_whole_model(ckpt: Path) -> LoadedCheckpoint:
    """A checkpoint's model at TP=PP=1 (call inside ``single_process``)."""
    cfg, state = checkpoint_config(ckpt)
    rows = vocab_rows(cfg, state)
    model = SCIGPTModel(whole_model_config(cfg), vocab_size=rows)
    load_weights(ckpt, model)
    return LoadedCheckpoint(model, cfg, state, rows)


def sci_logits(model: SCIGPTModel, tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, rows] (gathered over tensor-parallel ranks)."""
    from megatron.core import tensor_parallel

    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions).lm
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., :rows].float().cpu()


def model_skeleton(cfg: Config, rows: int) -> dict:
    """The sharded state dict of ``cfg``'s whole model (TP=PP=1) built on the meta device: the
    checkpoint keys, shapes and offsets of every tensor, with no storage (call inside
    ``single_process``). Built from megatron's local spec, whose checkpoint keys are the same
    as Transformer Engine's, so it describes a checkpoint whichever wrote it."""
    model = SCIGPTModel(
        whole_model_config(cfg), vocab_size=rows, use_te=False, device=torch.device("meta")
    )
    return model.sharded_state_dict()
