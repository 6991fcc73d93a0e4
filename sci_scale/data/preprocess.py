"""``sci-scale preprocess``: raw corpus files -> one megatron indexed dataset (.bin/.idx).

The input is cut into shards of ``shard_docs`` documents in input order. Each shard is tokenized
(in a pool of ``workers`` processes) and written as its own small indexed dataset under
``PREFIX.shards/``, atomically; when every shard exists they are concatenated in order with
megatron's ``IndexedDatasetBuilder.add_index`` into ``PREFIX.bin/.idx`` (``.idx`` renamed last).
So:
- the output does not depend on the number of workers (byte for byte);
- an interrupted run continues where it stopped: finished shards are kept and skipped, and a
  half-written shard or output never looks complete (its ``.idx`` is missing);
- a manifest of the inputs (paths, sizes, modification times), tokenizer and options guards the
  shards: if any of them changed, the old shards are discarded instead of mixed in.

Reading: JSONL is read line by line here, so that a bad record is reported with its file and
line (``datasets``' JSON reader can name neither); Parquet is streamed with ``datasets``
(``load_dataset(..., streaming=True)``), Arrow files are memory-mapped (``Dataset.from_file``)
and saved ``datasets`` directories opened with ``load_from_disk``, so inputs larger than memory
are fine. A JSON file holding one array goes through ``datasets``' JSON reader.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sci_scale.data.corpus import CorpusError, _parse_line
from sci_scale.data.indexed import (
    merge_indexed_datasets,
    open_indexed_dataset,
    write_dataset_meta,
    write_indexed_dataset,
)
from sci_scale.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards"
MANIFEST = "manifest.json"
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class PreprocessOptions:
    inputs: list[str]
    tokenizer: str
    out: str
    text_key: str = "text"
    workers: int = 1
    append_eod: bool = True
    skip_bad: bool = False
    shard_docs: int = 4096


@dataclass
class PreprocessResult:
    prefix: Path
    documents: int
    tokens: int
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    shards_reused: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Files and saved-dataset directories named by paths or globs, in a stable order."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        if not matches or not Path(matches[0]).exists():
            raise CorpusError(f"--input {pattern}: no such file or directory")
        paths += [Path(m) for m in matches]
    return paths


class BadRecords:
    """Bad input: an error naming file and line, or (with --skip-bad) a counted skip."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.counts: Counter = Counter()
        self.examples: list[str] = []

    def __call__(self, kind: str, message: str) -> None:
        if not self.skip:
            raise CorpusError(f"{message} (use --skip-bad to skip and count such records)")
        self.counts[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def _jsonl_texts(path: Path, text_key: str, bad: BadRecords) -> Iterator[str]:
    with path.open("rb") as stream:
        for lineno, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                yield _parse_line(raw, f"{path}:{lineno}", text_key)
            except CorpusError as exc:
                bad(_kind(str(exc)), str(exc))


def _kind(message: str) -> str:
    for key, kind in (("UTF-8", "not UTF-8"), ("JSON", "not JSON"), ("key", "missing key")):
        if key in message:
            return kind
    return "not text"


def _dataset_texts(rows: Any, where: str, text_key: str, bad: BadRecords) -> Iterator[str]:
    columns = getattr(rows, "column_names", None)
    if columns is not None and text_key not in columns:
        raise CorpusError(f"{where}: no {text_key!r} column (columns: {', '.join(columns)})")
    for row_number, row in enumerate(rows, start=1):
        text = row.get(text_key)
        if not isinstance(text, str):
            bad("not text", f"{where} row {row_number}: {text_key!r} is {type(text).__name__}")
            continue
        yield text


def iter_texts(path: Path, text_key: str, bad: BadRecords) -> Iterator[str]:
    """The documents of one input, whatever its format."""
    if path.is_dir():
        datasets = _datasets()
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise CorpusError(f"{path}: a DatasetDict without a 'train' split")
            loaded = loaded["train"]
        yield from _dataset_texts(loaded, str(path), text_key, bad)
        return
    if path.stat().st_size == 0:
        bad("empty file", f"{path}: the file is empty")
        return
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES or (suffix == ".json" and _first_byte(path) != b"["):
        yield from _jsonl_texts(path, text_key, bad)
    elif suffix == ".json":
        datasets = _datasets()
        rows = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
        yield from _dataset_texts(rows, str(path), text_key, bad)
    elif suffix == ".parquet":
        datasets = _datasets()
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        yield from _dataset_texts(rows, str(path), text_key, bad)
    elif suffix == ".arrow":
        datasets = _datasets()
        yield from _dataset_texts(datasets.Dataset.from_file(str(path)), str(path), text_key, bad)
    else:
        raise CorpusError(
            f"{path}: unknown format {suffix!r}; expected .jsonl, .json, .parquet, .arrow or a "
            "saved datasets directory"
        )


def _datasets() -> Any:
    """``datasets``, imported only for the formats that need it (it takes seconds)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as stream:
        for line in stream:
            stripped = line.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _shards(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _manifest(opts: PreprocessOptions, inputs: list[Path], tokenizer: Any) -> dict[str, Any]:
    def describe(path: Path) -> dict[str, Any]:
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    return {
        "inputs": [describe(p) for p in inputs],
        "tokenizer": dict(tokenizer.unique_identifiers),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("inputs", "out", "workers")},
    }


# -- workers ---------------------------------------------------------------------------------
# Set once in the parent; forked workers inherit it, already loaded.
_worker_tokenizer: Any = None


def _write_shard(task: tuple[int, list[str], str, bool]) -> tuple[int, int, int]:
    """Tokenize one shard and write it as ``shard_NNNNNN``; (index, documents, tokens)."""
    index, texts, shard_dir, append_eod = task
    tok = _worker_tokenizer
    prefix = Path(shard_dir) / f"shard_{index:06d}"
    eod = [tok.eod] if append_eod else []
    docs = (ids + eod for ids in tok.tokenize_batch(texts))
    try:
        n_docs, n_tokens = write_indexed_dataset(docs, prefix, tok.vocab_size)
    except ValueError as exc:
        if "no tokens" not in str(exc):
            raise
        prefix.with_suffix(".empty").touch()  # a shard of empty texts: nothing to concatenate
        n_docs = n_tokens = 0
    return index, n_docs, n_tokens


def _shard_done(shard_dir: Path, index: int) -> tuple[int, int] | None:
    prefix = shard_dir / f"shard_{index:06d}"
    if prefix.with_suffix(".empty").exists():
        return 0, 0
    if not prefix.with_suffix(".idx").exists():
        return None
    try:
        data = open_indexed_dataset(prefix)
    except ValueError:
        return None  # damaged: written again
    return len(data), int(data.sequence_lengths.sum())


# -- the run ---------------------------------------------------------------------------------
def preprocess(opts: PreprocessOptions, progress: bool | None = None) -> PreprocessResult:
    t0 = time.perf_counter()
    inputs = resolve_inputs(opts.inputs)
    global _worker_tokenizer
    tokenizer = _worker_tokenizer = load_tokenizer(opts.tokenizer)
    out = Path(opts.out)
    shard_dir = Path(f"{out}{SHARDS_SUFFIX}")
    manifest = _manifest(opts, inputs, tokenizer)
    manifest_path = shard_dir / MANIFEST
    if shard_dir.exists():
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if previous != manifest:
            log.warning("%s holds shards of other inputs or options: starting over", shard_dir)
            shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))

    bad = BadRecords(opts.skip_bad)
    texts = (t for path in inputs for t in iter_texts(path, opts.text_key, bad))
    result = PreprocessResult(out, 0, 0)
    bar = _progress_bar(progress)
    n_shards = 0

    def record(n_docs: int, n_tokens: int) -> None:
        result.documents += n_docs
        result.tokens += n_tokens
        bar.update(n_docs)
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{result.tokens:,} tokens, {result.tokens / elapsed:,.0f} tokens/s")

    def tasks() -> Iterator[tuple[int, list[str], str, bool]]:
        nonlocal n_shards
        for index, shard in enumerate(_shards(texts, opts.shard_docs)):
            n_shards = index + 1
            done = _shard_done(shard_dir, index)
            if done is not None:
                result.shards_reused += 1
                record(*done)
                continue
            yield index, shard, str(shard_dir), opts.append_eod

    try:
        if opts.workers <= 1:
            for task in tasks():
                record(*_write_shard(task)[1:])
        else:
            # fork: workers start with the tokenizer library already loaded (spawn would import
            # torch and megatron again in each, seconds apiece); they only tokenize and write.
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(opts.workers) as pool:
                # A bounded window of shards in flight (Pool.imap would read the whole input
                # ahead into memory); each shard lands in its own files, so order is free.
                pending: deque = deque()
                for task in tasks():
                    pending.append(pool.apply_async(_write_shard, (task,)))
                    if len(pending) >= 2 * opts.workers:
                        record(*pending.popleft().get()[1:])
                while pending:
                    record(*pending.popleft().get()[1:])
    finally:
        bar.close()
    if result.documents == 0:
        raise CorpusError(f"{', '.join(opts.inputs)}: no documents to write")
    parts = [
        shard_dir / f"shard_{i:06d}"
        for i in range(n_shards)
        if not (shard_dir / f"shard_{i:06d}.empty").exists()
    ]
    merge_indexed_datasets(parts, out, tokenizer.vocab_size)
    write_dataset_meta(
        out,
        {
            "tokenizer": dict(tokenizer.unique_identifiers),
            "inputs": manifest["inputs"],
            "options": manifest["options"],
            "documents": result.documents,
            "tokens": result.tokens,
            "skipped": dict(bad.counts),
        },
    )
    shutil.rmtree(shard_dir)
    result.skipped = bad.counts
    result.seconds = time.perf_counter() - t0
    result.bytes_on_disk = sum(Path(f"{out}{s}").stat().st_size for s in (".bin", ".idx"))
    for example in bad.examples:
        log.warning("skipped: %s", example)
    return result


def _progress_bar(enabled: bool | None):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(unit=" docs", disable=not enabled, mininterval=1.0)
