"""Tokenized corpora in megatron's .bin/.idx format, written and opened safely.

Writing goes through megatron-core's own ``IndexedDatasetBuilder`` so that the files are exactly
what its ``IndexedDataset``/``GPTDataset`` read. The builder writes in place, though, and a
crash would leave a plausible-looking pair behind; callers (and other ranks) treat an existing
``.idx`` as "dataset ready". So the builder writes to temporary files and they are renamed with
the ``.idx`` last. Opening checks the sizes the ``.idx`` implies against the ``.bin``, because
megatron memory-maps a truncated ``.bin`` without complaint and fails much later, far from the
cause. Before megatron builds its split indices, :func:`check_split_shares` checks that every
share of ``data.split`` holds a document: megatron's ``GPTDataset`` loops forever over an empty
one (``_get_num_epochs`` adds epochs of zero tokens until it has enough).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from sci_scale.config.split import SHARES
from sci_scale.data.corpus import CorpusError

# The .idx header: magic, version (<Q), dtype code (<B), sequence count (<Q), document count (<Q).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(CorpusError):
    """A .bin/.idx pair that is truncated, corrupt or empty, or too small for ``data.split``."""


def _as_document(doc: Sequence[int] | numpy.ndarray, index: int, vocab_size: int) -> numpy.ndarray:
    """Validate one document: the builder casts silently, so an out-of-range id would wrap."""
    arr = numpy.asarray(doc)
    if arr.size == 0:
        return arr
    if arr.ndim != 1 or not numpy.issubdtype(arr.dtype, numpy.integer):
        raise ValueError(
            f"document {index}: expected a 1-D sequence of integer ids, got {arr.dtype} "
            f"of shape {arr.shape}"
        )
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"document {index}: ids span [{low}, {high}], outside [0, {vocab_size})")
    return arr


def write_indexed_dataset(
    documents: Iterable[Sequence[int] | numpy.ndarray], prefix: str | Path, vocab_size: int
) -> tuple[int, int]:
    """Write ``<prefix>.bin`` and ``<prefix>.idx``; returns (documents, tokens) written.

    Empty documents are skipped, as megatron's preprocessing does; a dataset with no tokens at
    all is an error, since megatron cannot memory-map an empty ``.bin``. If anything fails
    (including the ``documents`` iterator), the files at ``prefix`` are left as they were.
    """
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = get_bin_path(tmp), get_idx_path(tmp)
    builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(vocab_size))
    n_docs = n_tokens = 0
    try:
        for index, doc in enumerate(documents):
            arr = _as_document(doc, index, vocab_size)
            if arr.size == 0:
                continue
            builder.add_document(arr, [arr.size])
            n_docs += 1
            n_tokens += arr.size
        if n_tokens == 0:
            raise IndexedDatasetError(f"{prefix}: no tokens to write (every document was empty)")
        builder.finalize(tmp_idx)
        _commit(tmp, prefix)
    except BaseException:
        _discard(builder, tmp)
        raise
    return n_docs, n_tokens


def _commit(tmp: str, prefix: str) -> None:
    """Move a finished temporary pair into place, ``.idx`` last.

    Without the old .idx the target reads as absent, never as old index + new data."""
    Path(get_idx_path(prefix)).unlink(missing_ok=True)
    os.replace(get_bin_path(tmp), get_bin_path(prefix))
    os.replace(get_idx_path(tmp), get_idx_path(prefix))


def _discard(builder: IndexedDatasetBuilder, tmp: str) -> None:
    builder.data_file.close()
    Path(get_bin_path(tmp)).unlink(missing_ok=True)
    Path(get_idx_path(tmp)).unlink(missing_ok=True)


def _append(builder: IndexedDatasetBuilder, part: IndexedDataset, prefix: str) -> None:
    """What ``IndexedDatasetBuilder.add_index`` does, without the full ``gc.collect()`` it runs
    for every part (0.27 s each in a process holding torch and megatron: with thousands of
    shards that would dominate the whole preprocessing run)."""
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(part.sequence_lengths.tolist())
    builder.document_indices.extend((offset + part.document_indices[1:]).tolist())
    with open(get_bin_path(prefix), "rb") as source:
        shutil.copyfileobj(source, builder.data_file)


def merge_indexed_datasets(
    parts: Sequence[str | Path], prefix: str | Path, vocab_size: int
) -> None:
    """Concatenate indexed datasets, in order, into ``prefix`` (atomically, through megatron's
    ``IndexedDatasetBuilder``); each part is checked whole first."""
    prefix = str(prefix)
    tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=DType.optimal_dtype(vocab_size))
    try:
        for part in parts:
            _append(builder, open_indexed_dataset(part), str(part))
        builder.finalize(get_idx_path(tmp))
        _commit(tmp, prefix)
    except BaseException:
        _discard(builder, tmp)
        raise


def _check_consistent(prefix: str, idx_path: str, bin_path: str) -> None:
    """Raise IndexedDatasetError unless the .idx is well formed and the .bin has the size the
    .idx implies."""
    idx_size = os.path.getsize(idx_path)
    if idx_size < _IDX_HEADER.size:
        raise IndexedDatasetError(f"{idx_path}: {idx_size} bytes, too short for an index header")
    with open(idx_path, "rb") as stream:
        magic, version, code, n_seq, n_doc = _IDX_HEADER.unpack(stream.read(_IDX_HEADER.size))
    if magic != _IDX_MAGIC or version != 1:
        raise IndexedDatasetError(f"{idx_path}: not a megatron indexed-dataset index (version 1)")
    try:
        itemsize = DType.size(code)
    except ValueError:
        raise IndexedDatasetError(f"{idx_path}: unknown token dtype code {code}") from None
    # sequence lengths (int32), sequence pointers (int64), document indices (int64)
    expected_idx = _IDX_HEADER.size + n_seq * (4 + 8) + n_doc * 8
    if idx_size != expected_idx:
        raise IndexedDatasetError(
            f"{idx_path}: {idx_size} bytes, but its header ({n_seq} sequences, {n_doc} document "
            f"boundaries) implies {expected_idx}; the index is truncated or corrupt"
        )
    lengths = numpy.fromfile(idx_path, numpy.int32, count=n_seq, offset=_IDX_HEADER.size)
    doc_end = numpy.fromfile(idx_path, numpy.int64, count=1, offset=expected_idx - 8)
    if n_doc == 0 or int(doc_end[0]) != n_seq or (lengths < 0).any():
        raise IndexedDatasetError(f"{idx_path}: document indices do not match the sequence count")
    expected_bin = int(lengths.sum(dtype=numpy.int64)) * itemsize
    bin_size = os.path.getsize(bin_path)
    if expected_bin == 0:
        raise IndexedDatasetError(
            f"indexed dataset {prefix} is empty ({n_seq} documents, no tokens): preprocess a "
            "corpus that has text in it"
        )
    if bin_size != expected_bin:
        raise IndexedDatasetError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} describes {expected_bin} "
            f"({expected_bin // itemsize} tokens of {itemsize} bytes); the .bin is truncated "
            "or belongs to another dataset"
        )


def open_indexed_dataset(prefix: str | Path) -> IndexedDataset:
    """Megatron's ``IndexedDataset`` at ``prefix``, after checking that the pair is whole."""
    prefix = str(prefix)
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"indexed dataset {prefix}: missing {', '.join(missing)}")
    _check_consistent(prefix, idx_path, bin_path)
    return IndexedDataset(prefix, multimodal=False, mmap=True)


def _share_bounds(matrix: list[Any], documents: int) -> list[tuple[int, int] | None]:
    """The documents of each share, rounded as megatron's ``BlendedMegatronDatasetBuilder``
    rounds them (``_build_megatron_dataset_splits``); None for a share of weight 0."""
    return [
        None if ends is None else (round(ends[0] * documents), round(ends[1] * documents))
        for ends in matrix
    ]


def _documents_needed(matrix: list[Any]) -> int:
    """The fewest documents from which on every share of weight > 0 holds one: above 1 / the
    smallest share it always does (rounding moves each end by at most half a document)."""
    enough = int(1 / min(ends[1] - ends[0] for ends in matrix if ends is not None)) + 1
    fewest = enough
    while (
        fewest > 1
        and enough < 10**6
        and all(b is None or b[1] > b[0] for b in _share_bounds(matrix, fewest - 1))
    ):
        fewest -= 1
    return fewest


def check_split_shares(
    prefixes: Sequence[str | Path], split: str, names: Sequence[str] | None = None
) -> None:
    """Every share of ``split`` megatron builds must get a document of every corpus.

    megatron splits each corpus by document; a share left without one has zero tokens, and
    ``GPTDataset._get_num_epochs`` then adds empty epochs forever (a hang, not an error). A
    share with a document always yields blocks (megatron repeats it over epochs). ``names``:
    what to call each corpus in the message (default: its prefix).
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for index, prefix in enumerate(prefixes):
        dataset = open_indexed_dataset(prefix)  # held: its lengths live in its memory map
        lengths = dataset.sequence_lengths
        for share, bounds in zip(SHARES, _share_bounds(matrix, len(lengths)), strict=True):
            if bounds is None or bounds[1] > bounds[0]:
                continue
            name = names[index] if names else f"indexed dataset {prefix}"
            raise IndexedDatasetError(
                f"{name} has {len(lengths)} documents ({int(lengths.sum()):,} tokens), too few "
                f"for data.split={split!r}: its {share} share gets none, and megatron needs "
                f"at least one document in every share; use at least "
                f"{_documents_needed(matrix)} documents or a larger {share} share"
            )


def tokenize_documents(
    texts: Iterable[str], tokenizer: Any, append_eod: bool = True
) -> Iterator[list[int]]:
    """One id list per text, lazily, ending in ``eod`` so packed documents stay delimited.

    The output is one-to-one with the input: with ``append_eod`` even an empty text gives
    ``[eod]``, so document i of the written dataset is text i.
    """
    eod = tokenizer.eod
    for text in texts:
        ids = list(tokenizer.tokenize(text))
        if append_eod:
            ids.append(eod)
        yield ids


META_SUFFIX = ".meta.json"


def write_dataset_meta(prefix: str | Path, meta: dict[str, Any]) -> None:
    """What made a dataset (tokenizer identity, inputs, counts), beside its .bin/.idx."""
    path = Path(f"{prefix}{META_SUFFIX}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_dataset_meta(prefix: str | Path) -> dict[str, Any] | None:
    path = Path(f"{prefix}{META_SUFFIX}")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexedDatasetError(f"{path}: not valid JSON ({exc}); preprocess again") from None
