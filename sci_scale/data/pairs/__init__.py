"""Structural pair generators: SCAN, arithmetic word problems, COGS and user JSONL.

Each generator yields :class:`Example` records (text, structural template, source, split);
examples sharing a template are positives for the structural contrastive loss. Held-out material
of a split (``Example.split != "train"``) never enters training blocks.
"""

from __future__ import annotations

from pathlib import Path

from sci_scale.data.pairs.arithmetic import arithmetic_examples, heldout_templates
from sci_scale.data.pairs.base import Example, PairDataError
from sci_scale.data.pairs.cogs import cogs_examples, cogs_template
from sci_scale.data.pairs.scan import (
    SCAN_SPLITS,
    enumerate_commands,
    format_scan_line,
    interpret,
    scan_examples,
    scan_split,
    scan_template,
)
from sci_scale.data.pairs.user import user_examples

PAIR_SOURCES: tuple[str, ...] = ("scan", "arithmetic", "cogs", "user")

__all__ = [
    "PAIR_SOURCES",
    "SCAN_SPLITS",
    "Example",
    "PairDataError",
    "arithmetic_examples",
    "cogs_examples",
    "cogs_template",
    "enumerate_commands",
    "format_scan_line",
    "heldout_templates",
    "interpret",
    "load_pair_examples",
    "scan_examples",
    "scan_split",
    "scan_template",
    "user_examples",
]


def _cogs_train_file(cogs_path: str | Path) -> Path:
    """``cogs_path`` is a COGS directory (its ``train.tsv`` is read) or a TSV file."""
    path = Path(cogs_path)
    if path.is_dir():
        path = path / "train.tsv"
    if not path.is_file():
        raise PairDataError(
            f"COGS data not found: {path} (give a directory holding train.tsv or a TSV file)"
        )
    return path


def load_pair_examples(
    sources: list[str],
    *,
    seed: int = 0,
    scan_split: str = "simple",
    arithmetic_per_template: int = 40,
    cogs_path: str | None = None,
    user_pairs_path: str | None = None,
) -> list[Example]:
    """The training-side examples of the named sources, concatenated in the order given.

    ``"scan"``: the train part of SCAN split ``scan_split``; ``"arithmetic"``: the templates not
    held out, ``arithmetic_per_template`` problems each; ``"cogs"``: ``train.tsv`` of the
    directory ``cogs_path`` (or that TSV file); ``"user"``: the examples of ``user_pairs_path``
    whose split is ``"train"``. Raises :class:`PairDataError` for an unknown source or a source
    whose path is None.
    """
    unknown = [s for s in sources if s not in PAIR_SOURCES]
    if unknown:
        raise PairDataError(
            f"unknown pair source(s) {', '.join(map(repr, unknown))}; "
            f"valid sources: {', '.join(PAIR_SOURCES)}"
        )
    if "cogs" in sources and cogs_path is None:
        raise PairDataError("pair source 'cogs' needs a COGS path (cogs_path / data.cogs_path)")
    if "user" in sources and user_pairs_path is None:
        raise PairDataError(
            "pair source 'user' needs a JSONL path (user_pairs_path / data.user_pairs_path)"
        )
    out: list[Example] = []
    for source in sources:
        if source == "scan":
            out += scan_examples(scan_split, seed=seed)
        elif source == "arithmetic":
            out += arithmetic_examples(per_template=arithmetic_per_template, seed=seed)
        elif source == "cogs":
            assert cogs_path is not None
            out += cogs_examples(_cogs_train_file(cogs_path), split="train")
        elif source == "user":
            assert user_pairs_path is not None
            out += [e for e in user_examples(user_pairs_path) if e.split == "train"]
    return out
