"""The trainer's data, whichever kind of corpus the config names.

A text corpus (``stdlib_docstrings``, ``jsonl``, ``indexed``) is built by
:mod:`sci_scale.data.pipeline`; ``data.corpus=task`` trains on a benchmark's training part
(:mod:`sci_scale.data.task`): task blocks in place of corpus blocks, validation on the dev set
carved from the training part, and pair blocks (``data.pair_rate``) drawn from the same training
part, blended by the same code. The tokenizer, when sci-scale trains one, sees the training part
only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.utils import Split

from sci_scale.config.schema import Config
from sci_scale.config.task import parse_task
from sci_scale.data.blocks import BlockStream
from sci_scale.data.pairs.base import Example
from sci_scale.data.pipeline import (
    DataBundle,
    _tokenizer,
    mix_pairs,
    num_eval_samples,
    num_train_samples,
    tokenize_examples,
)
from sci_scale.data.pipeline import build_data as build_corpus_data
from sci_scale.data.task import TaskExample, TaskParts, task_parts
from sci_scale.data.task_blocks import TaskBlockDataset

log = logging.getLogger(__name__)


def build_data(cfg: Config, run_dir: Path) -> DataBundle:
    """Everything the trainer reads, built once and cached."""
    if cfg.data.corpus == "task":
        return build_task_data(cfg, run_dir)
    return build_corpus_data(cfg, run_dir)


def config_task_parts(cfg: Config) -> TaskParts:
    assert cfg.data.task is not None  # the config rules require it with corpus=task
    return task_parts(parse_task(cfg.data.task), cfg.data.task_dev_examples, cfg.data.cogs_path)


def _examples(task: list[TaskExample], benchmark: str, split: str) -> list[Example]:
    return [Example(ex.text, ex.template, benchmark, split) for ex in task]


def build_task_data(cfg: Config, run_dir: Path) -> DataBundle:
    d, seed, seq = cfg.data, cfg.train.seed, cfg.model.seq_length
    cache = Path(d.cache_dir) if d.cache_dir else run_dir / "data"
    cache.mkdir(parents=True, exist_ok=True)
    spec = parse_task(d.task or "")
    parts = config_task_parts(cfg)
    tokenizer = _tokenizer(cfg, cache, [ex.text for ex in parts.train], [])
    train_tok = tokenize_examples(_examples(parts.train, spec.benchmark, "train"), tokenizer, True)
    dev_tok = tokenize_examples(_examples(parts.dev, spec.benchmark, "dev"), tokenizer, True)
    needed = math.ceil(num_train_samples(cfg) * (1 - d.pair_rate) * 1.01) + 1
    train = TaskBlockDataset(
        train_tok, seq, tokenizer.pad, needed, seed, d.target_loss_only, f"{spec.name} train"
    )
    dev = TaskBlockDataset(
        dev_tok, seq, tokenizer.pad, num_eval_samples(cfg), seed, d.target_loss_only,
        f"{spec.name} dev",
    )  # fmt: skip
    log.info(
        "task %s: %d training examples (%.1f epochs in %d blocks), %d dev, %d test held out",
        spec.name, len(parts.train), train.epochs, needed, len(parts.dev), len(parts.test),
    )  # fmt: skip
    # The blend index is small (one entry per training block) and built alike on every rank.
    blend_config = BlendedMegatronDatasetConfig(
        random_seed=seed, sequence_length=seq, blend=([str(cache)], None), split="1,0,0",
        tokenizer=tokenizer,
    )  # fmt: skip
    return mix_pairs(
        cfg,
        cache,
        tokenizer,
        (BlockStream(train, Split.train, "pairs"), BlockStream(dev, Split.valid, "pairs")),
        (parts.pair_examples(spec.benchmark), parts.dev_pair_examples(spec.benchmark)),
        blend_config,
    )
