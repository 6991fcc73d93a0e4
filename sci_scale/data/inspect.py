"""``sci-scale data inspect``: what an indexed dataset holds, and what a config's blend yields."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sci_scale.data.indexed import open_indexed_dataset, read_dataset_meta
from sci_scale.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from sci_scale.data.pipeline import DataBundle


def _histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Document lengths in power-of-two buckets, as text bars."""
    top = max(1, int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1))))
    edges = [0, *[2**k for k in range(top + 1)]]
    counts = np.histogram(lengths, bins=edges)[0]
    peak = max(int(counts.max()), 1)
    return [
        f"  {lo:>8}-{hi - 1:<8} {count:>9,} {'#' * round(width * count / peak)}"
        for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True)
        if count
    ]


def describe_dataset(prefix: str, tokenizer: str | None = None, sample_chars: int = 300) -> str:
    data = open_indexed_dataset(prefix)
    lengths = np.asarray(data.sequence_lengths)
    meta = read_dataset_meta(prefix) or {}
    lines = [
        f"dataset     {prefix}",
        f"documents   {len(lengths):,}",
        f"tokens      {int(lengths.sum()):,}",
        f"length      min {lengths.min()}, median {int(np.median(lengths))}, "
        f"mean {lengths.mean():.1f}, max {lengths.max()} tokens",
        f"on disk     {Path(f'{prefix}.bin').stat().st_size / lengths.sum():.2f} bytes per token "
        f"({data.index.dtype.__name__})",
        "length histogram (tokens: documents)",
        *_histogram(lengths),
    ]
    source = tokenizer or meta.get("tokenizer", {}).get("tokenizer_path")
    if source:
        tok = load_tokenizer(source)
        text = tok.detokenize(data[0])
        cut = text[:sample_chars] + (" ..." if len(text) > sample_chars else "")
        lines += [f"document 0, decoded with {source}:", f"  {cut!r}"]
    return "\n".join(lines)


def describe_blend(config: str, blocks: int) -> str:
    from sci_scale.config import load_config
    from sci_scale.data.build import build_data

    cfg = load_config(config)
    bundle = build_data(cfg, Path(cfg.run.dir))
    d = cfg.data
    if d.corpus == "indexed":
        prefixes = d.corpus_paths
    else:
        prefixes = [f"task {d.task}" if d.corpus == "task" else "corpus"]
    weights = cfg.data.corpus_weights or [1.0] * len(prefixes)
    total = sum(weights)
    realised = realised_blend(bundle, prefixes, blocks)
    n = min(blocks, len(bundle.train))
    lines = [f"realised blend over the first {n:,} training blocks of {config}:"]
    for prefix, weight in zip(prefixes, weights, strict=True):
        target = (1 - cfg.data.pair_rate) * weight / total
        lines.append(f"  {prefix}: {realised[prefix]:.4f} (target {target:.4f})")
    lines.append(f"  pairs: {realised['pairs']:.4f} (target {cfg.data.pair_rate:.4f})")
    return "\n".join(lines)


def inspect_dataset(
    prefix: str | None, tokenizer: str | None, config: str | None, blocks: int
) -> str:
    if prefix is None and config is None:
        raise FileNotFoundError("give an indexed dataset PREFIX, --config CONFIG, or both")
    parts = []
    if prefix is not None:
        parts.append(describe_dataset(prefix, tokenizer))
    if config is not None:
        parts.append(describe_blend(config, blocks))
    return "\n\n".join(parts)


def realised_blend(bundle: DataBundle, prefixes: list[str], blocks: int) -> dict[str, float]:
    """Fractions of the first ``blocks`` training blocks drawn from each corpus and the pairs.

    Read from megatron's blend indices: the top level chooses corpus or pairs per block, and,
    with several corpora, the corpus blend chooses among them per corpus block."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    train = bundle.train
    n = min(blocks, len(train))
    if isinstance(train, BlendedDataset):
        source = np.asarray(train.dataset_index[:n])
        corpus_sample = np.asarray(train.dataset_sample_index[:n])[source == 0]
        corpus_stream = train.datasets[0]
        fractions = {"pairs": float(np.mean(source == 1))}
    else:
        corpus_sample, corpus_stream = np.arange(n), train
        fractions = {"pairs": 0.0}
    inner = corpus_stream.inner
    if isinstance(inner, BlendedDataset):
        which = np.asarray(inner.dataset_index)[corpus_sample]
        for i, prefix in enumerate(prefixes):
            fractions[prefix] = float(np.sum(which == i)) / n
    else:
        fractions[prefixes[0]] = len(corpus_sample) / n
    return fractions
