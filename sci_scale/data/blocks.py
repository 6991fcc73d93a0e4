"""Training blocks: packed corpus sequences and structural pair blocks, in one format.

A *block* is one packed training sequence of ``seq_length`` tokens. Every block carries:

- ``tokens``, ``labels``, ``loss_mask``, ``position_ids``: ``[seq_length]`` as in megatron's
  ``GPTDataset``;
- ``example_ids``: ``[seq_length]``, which example each input token belongs to (corpus blocks
  are one example, id 0; padding is -1). The SCI branch masks attention across examples;
- ``template_ids``: ``[MAX_EXAMPLES]``, the structural template of each example, -1 where none.
  Only pair blocks have templates, so SCL runs only on them.

A pair block packs several examples so that every template in it appears at least twice
(anchor + partner(s)). Blocks are built on demand from a generator seeded with (seed, index):
random access, no precomputation, and the same block for the same index on every rank and run.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

MAX_EXAMPLES = 64  # template slots per block; a 4096-token block of 64-token examples fits


@dataclass(frozen=True)
class TokenizedExample:
    tokens: np.ndarray  # int32, ends with the end-of-document token
    template_id: int  # stable 63-bit id of the template key
    source: str
    # tokens before the target (the "IN: ... OUT:" prompt); with data.target_loss_only the
    # LM loss is on the target and the end token only
    prompt_length: int = 0


def template_id(template: str) -> int:
    """A stable id for a template key, equal across processes, runs and Python versions."""
    digest = hashlib.blake2b(template.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def block_identity(
    dataset: Dataset, name: str, examples: Sequence[TokenizedExample], **settings: Any
) -> OrderedDict[str, Any]:
    """What makes a block dataset's blocks what they are (megatron's ``unique_identifiers``,
    which key its cached blend indices): the class, the examples' content, the settings."""
    fingerprint = hashlib.sha256()
    for ex in examples:
        fingerprint.update(ex.tokens.tobytes())
        fingerprint.update(ex.template_id.to_bytes(8, "little"))
        fingerprint.update(ex.prompt_length.to_bytes(4, "little"))
    return OrderedDict(
        [("class", type(dataset).__name__), ("name", name),
         ("examples", fingerprint.hexdigest()), *settings.items()]
    )  # fmt: skip


class PairBlockDataset(Dataset):
    """Pair blocks drawn from tokenized structural examples.

    Sources are chosen uniformly, then a template uniformly within the source, so a source with
    thousands of templates (SCAN) does not crowd out one with dozens (arithmetic).
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        seq_length: int,
        pad_id: int,
        num_samples: int,
        seed: int,
        examples_per_template: int = 2,
        name: str = "pairs",
        target_loss_only: bool = False,
    ) -> None:
        by_template: dict[int, list[int]] = defaultdict(list)
        source_of: dict[int, str] = {}
        for i, ex in enumerate(examples):
            if len(ex.tokens) * examples_per_template <= seq_length + 1:
                by_template[ex.template_id].append(i)
                source_of[ex.template_id] = ex.source
        templates_by_source: dict[str, list[int]] = defaultdict(list)
        for tid in sorted(by_template):
            if len(by_template[tid]) >= examples_per_template:
                templates_by_source[source_of[tid]].append(tid)
        if not templates_by_source:
            raise ValueError(
                f"{name}: no template has {examples_per_template} examples that fit "
                f"a block of {seq_length} tokens"
            )
        self.examples = examples
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.num_samples = num_samples
        self.seed = seed
        self.k = examples_per_template
        self.target_loss_only = target_loss_only
        self.by_template = {t: np.asarray(v) for t, v in by_template.items()}
        self.sources = sorted(templates_by_source)
        self.templates_by_source = {s: np.asarray(v) for s, v in templates_by_source.items()}
        self.unique_identifiers = block_identity(
            self, name, examples, seq_length=seq_length, num_samples=num_samples, seed=seed,
            examples_per_template=examples_per_template, target_loss_only=target_loss_only,
        )  # fmt: skip

    @property
    def num_templates(self) -> int:
        return sum(len(v) for v in self.templates_by_source.values())

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(idx)])
        budget = self.seq_length + 1  # inputs and shifted labels come from one buffer
        pieces: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        templates: list[int] = []
        prompts: list[int] = []
        used = 0
        failures = 0
        while failures < 8 and len(templates) + self.k <= MAX_EXAMPLES:
            source = self.sources[rng.integers(len(self.sources))]
            pool = self.templates_by_source[source]
            tid = int(pool[rng.integers(len(pool))])
            members = self.by_template[tid]
            chosen = rng.choice(members, size=self.k, replace=False)
            length = sum(len(self.examples[i].tokens) for i in chosen)
            if used + length > budget or tid in templates:
                failures += 1
                continue
            for i in chosen:
                tokens = self.examples[i].tokens
                owners.append(np.full(len(tokens), len(templates), dtype=np.int64))
                pieces.append(tokens)
                prompts.append(self.examples[i].prompt_length)
                templates.append(tid)
            used += length
        return pack_block(
            pieces, owners, templates, self.seq_length, self.pad_id,
            prompts if self.target_loss_only else None,
        )  # fmt: skip


def pack_block(
    pieces: list[np.ndarray],
    owners: list[np.ndarray],
    templates: list[int],
    seq_length: int,
    pad_id: int,
    prompt_lengths: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Lay out examples as one block; padding has example id -1 and no loss. With
    ``prompt_lengths`` (one per piece), a label is trained on only where it is a piece's target
    or end token: the prompt's tokens are given, never predicted."""
    buffer = np.full(seq_length + 1, pad_id, dtype=np.int64)
    owner = np.full(seq_length + 1, -1, dtype=np.int64)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    buffer[: len(flat)] = flat
    if owners:
        owner[: len(flat)] = np.concatenate(owners)
    trained = owner >= 0
    if prompt_lengths is not None:
        start = 0
        for piece, prompt in zip(pieces, prompt_lengths, strict=True):
            trained[start : start + prompt] = False
            start += len(piece)
    template_ids = np.full(MAX_EXAMPLES, -1, dtype=np.int64)
    template_ids[: len(templates)] = templates
    return {
        "tokens": buffer[:-1],
        "labels": buffer[1:],
        "loss_mask": trained[1:].astype(np.float32),
        "position_ids": np.arange(seq_length, dtype=np.int64),
        "example_ids": owner[:-1],
        "template_ids": template_ids,
    }


def document_ids(tokens: np.ndarray, eod: int) -> np.ndarray:
    """Which document each token of a packed corpus block belongs to: the end-of-document
    token closes its document (megatron's ``reset_attention_mask`` boundary)."""
    ends = (np.asarray(tokens) == eod).astype(np.int64)
    return np.concatenate([[0], np.cumsum(ends)[:-1]])


class BlockStream(Dataset):
    """One stream of blocks (a corpus or the pairs) in the common block format.

    With ``document_eod`` (``data.reset_attention_mask``), each document of a corpus block is
    an example of its own, so attention stays within it.

    megatron's ``BlendedDataset`` requires every blended dataset to be of one type; corpus
    (megatron ``GPTDataset``) and pair blocks differ, so both are wrapped in this class.
    """

    def __init__(
        self, inner: Any, index_split: Any, kind: str, document_eod: int | None = None
    ) -> None:
        self.inner = inner
        self.document_eod = document_eod  # set: corpus documents get their own example ids
        self.index_split = index_split
        self.kind = kind
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict(
            [
                ("class", type(self).__name__),
                ("kind", kind),
                ("inner", getattr(inner, "unique_identifiers", type(inner).__name__)),
            ]
        )
        self.unique_description = json.dumps(self.unique_identifiers, default=str)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        sample = self.inner[int(idx)]
        if self.kind == "pairs":
            return sample
        seq = len(sample["tokens"])
        return {
            "tokens": np.asarray(sample["tokens"], dtype=np.int64),
            "labels": np.asarray(sample["labels"], dtype=np.int64),
            "loss_mask": np.asarray(sample["loss_mask"], dtype=np.float32),
            "position_ids": np.asarray(sample["position_ids"], dtype=np.int64),
            "example_ids": (
                np.zeros(seq, dtype=np.int64)
                if self.document_eod is None
                else document_ids(sample["tokens"], self.document_eod)
            ),
            "template_ids": np.full(MAX_EXAMPLES, -1, dtype=np.int64),
        }
