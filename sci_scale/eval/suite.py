"""Every evaluation of one loaded checkpoint: held-out perplexity, SCAN / COGS exact match and
the structural probe, as one flat dict of figures (what ``sci-scale eval`` prints and the
ablation tabulates)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sci_scale.checkpoint.load import (
    LoadedCheckpoint,
    checkpoint_tokenizer,
    load_whole_model,
    single_process,
)
from sci_scale.data.pipeline import heldout_corpus, pair_examples, tokenize_examples
from sci_scale.eval import generalization as gen
from sci_scale.eval.perplexity import perplexity
from sci_scale.eval.probe import probe_embeddings, probe_metrics, probe_set

log = logging.getLogger(__name__)


@dataclass
class EvalPlan:
    ppl_blocks: int = 0  # at most this many blocks, never past one pass; 0: no perplexity
    scan_splits: list[str] = field(default_factory=list)
    scan_part: str = "test"
    cogs_file: Path | None = None
    limit: int | None = None  # examples per SCAN split / COGS
    batch_size: int = 64
    max_new_tokens: int | None = None  # None: the longest gold output + 2
    probe_templates: int = 0  # 0: no probe
    progress: bool = False


def token_budget(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> int:
    """New tokens enough for the longest gold output and its end-of-document token: a longer
    generation cannot be an exact match, so decoding further only costs time."""
    lengths = [len(ids) for ids in tokenizer.tokenize_batch([" " + gold for _, gold in pairs])]
    return max(lengths, default=0) + 2


def _exact_match(
    loaded: LoadedCheckpoint, tokenizer: Any, plan: EvalPlan, task: str, pairs
) -> gen.EvalResult:
    budget = plan.max_new_tokens or token_budget(tokenizer, pairs)
    generate = gen.GreedyGenerator(
        loaded.model, tokenizer, loaded.rows, budget, plan.batch_size, plan.progress
    )
    return gen.exact_match(generate, task, pairs)


def evaluate_checkpoint(
    loaded: LoadedCheckpoint, tokenizer: Any, plan: EvalPlan, cache: Path
) -> dict[str, float]:
    """Figures of a loaded checkpoint (inside ``single_process``); ``cache`` holds the
    tokenized held-out corpus."""
    cfg, out = loaded.cfg, {}
    if plan.ppl_blocks:
        blocks = heldout_corpus(cfg, cache, tokenizer)  # one pass, shuffled
        count = min(len(blocks), plan.ppl_blocks)
        result = perplexity(loaded.model, [blocks[i] for i in range(count)])
        out.update(
            {"heldout_nll": result.nll, "heldout_ppl": result.ppl, "heldout_tokens": result.tokens}
        )
        log.info("held-out perplexity %.2f over %d tokens", result.ppl, result.tokens)
    for split in plan.scan_splits:
        part = plan.scan_part
        pairs = gen.scan_pairs(split, part, plan.limit, cfg.train.seed)
        result = _exact_match(loaded, tokenizer, plan, f"scan/{split}/{part}", pairs)
        out[f"scan_{split}" if part == "test" else f"scan_{split}_{part}"] = result.accuracy
        log.info("%s: %d/%d exact", result.task, result.correct, result.examples)
    if plan.cogs_file is not None:
        pairs = gen.cogs_pairs(plan.cogs_file, plan.limit)
        result = _exact_match(loaded, tokenizer, plan, f"cogs/{plan.cogs_file.stem}", pairs)
        out["cogs"] = result.accuracy
        log.info("%s: %d/%d exact", result.task, result.correct, result.examples)
    if plan.probe_templates:
        _, heldout = pair_examples(cfg) if cfg.data.pair_sources else ([], [])
        if not heldout:
            raise ValueError(
                "the structural probe needs held-out pairs: the checkpoint's config has no "
                "data.pair_sources with a held-out part (set data.pair_sources, e.g. [scan])"
            )
        examples = probe_set(tokenize_examples(heldout, tokenizer), plan.probe_templates)
        out.update(probe_metrics(probe_embeddings(loaded.model, examples, plan.batch_size)))
        out["probe_examples"] = len(examples)
    return out


def eval_cache_dir(cfg: Any, ckpt: Path) -> Path:
    """Where evaluation caches tokenized held-out text: ``data.cache_dir``, else the run's
    data cache for a checkpoint of a run (``RUN_DIR/checkpoints/step_N``), else a directory
    beside the checkpoint (an imported backbone)."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "data"
    return ckpt.with_name(f"{ckpt.name}.eval-data")


def evaluate_checkpoint_dir(
    ckpt: Path, plan: EvalPlan, corpus: str | None = None
) -> dict[str, float]:
    """Load a checkpoint in one process and evaluate it; ``corpus``: a JSONL file whose whole
    text is the perplexity slice instead of the run's own test share."""
    with single_process():
        loaded = load_whole_model(ckpt)
        tokenizer = checkpoint_tokenizer(loaded.cfg, loaded.state)
        if corpus:
            data = loaded.cfg.data.replace(corpus="jsonl", corpus_paths=[corpus],
                                           split="0,0,1", max_docs=None)  # fmt: skip
            loaded.cfg = loaded.cfg.replace(data=data)
        return evaluate_checkpoint(loaded, tokenizer, plan, eval_cache_dir(loaded.cfg, ckpt))
