"""Preprocessing throughput on this machine: ``sci-scale preprocess`` with 1 and 2 workers
against a plain single-process loop (read JSONL, tokenize, megatron's IndexedDatasetBuilder)
over the same files with the same tokenizer, in one run. Prints tokens/s, tokens/s per core,
the ratios and the size on disk per token.

    .venv/bin/python tools/preprocess_bench.py [--copies 8] [--workdir /tmp/sci-scale-prep-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from sci_scale.data.corpus import stdlib_docstrings, write_jsonl_texts
from sci_scale.data.preprocess import PreprocessOptions, preprocess
from sci_scale.data.tokenizer import load_tokenizer, train_sentencepiece


def plain_loop(files: list[Path], tokenizer_path: Path, prefix: Path) -> tuple[int, float]:
    """What one would write without sci-scale: one process, line by line."""
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_path)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    tokens = 0
    for path in files:
        with path.open() as stream:
            for line in stream:
                ids = [*tok.tokenize(json.loads(line)["text"]), tok.eod]
                builder.add_document(ids, [len(ids)])
                tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return tokens, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of the stdlib corpus")
    parser.add_argument("--workdir", default="/tmp/sci-scale-prep-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    texts = stdlib_docstrings()
    files = []
    for i in range(args.copies):  # distinct files, as a corpus arrives
        files.append(work / f"part{i:02d}.jsonl")
        write_jsonl_texts(texts, files[-1])
    tokenizer = train_sentencepiece(texts, work / "tok", vocab_size=8000)
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    print(
        f"input: {len(files)} JSONL files, {len(texts) * len(files):,} documents, {size_mb:.1f} MB"
    )
    print(f"tokenizer: sentencepiece BPE, 8,000 pieces; machine: {os.cpu_count()} cores")

    tokens, plain_s = plain_loop(files, tokenizer, work / "plain")
    plain_rate = tokens / plain_s
    print(f"plain loop   : {tokens:,} tokens in {plain_s:6.1f}s = {plain_rate:10,.0f} tokens/s")
    for workers in (1, 2):
        opts = PreprocessOptions([str(f) for f in files], str(tokenizer), str(work / f"w{workers}"))
        opts.workers = workers
        result = preprocess(opts, progress=False)
        assert result.tokens == tokens
        rate = result.tokens_per_s
        print(
            f"{workers} worker(s)  : {result.tokens:,} tokens in {result.seconds:6.1f}s = "
            f"{rate:10,.0f} tokens/s ({rate / workers:,.0f} per worker core), "
            f"{rate / plain_rate:.2f}x the plain loop, "
            f"{result.bytes_on_disk / result.tokens:.3f} bytes/token on disk"
        )
    same = all(
        (work / f"w1{s}").read_bytes()
        == (work / f"w2{s}").read_bytes()
        == (work / f"plain{s}").read_bytes()
        for s in (".bin", ".idx")
    )
    print(f"1 worker, 2 workers and the plain loop wrote identical files: {same}")


if __name__ == "__main__":
    main()
