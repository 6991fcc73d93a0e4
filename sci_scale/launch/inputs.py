"""The files a job reads, made absolute and checked when it is submitted.

A batch job starts in its run directory, possibly hours after ``sci-scale submit`` and on
another node, so a relative path in the config would be read against the wrong directory, and
a missing file would be found only when the job runs. ``submit`` therefore rewrites every path
setting against the directory it is run from and checks, before anything is queued, that each
input exists and is readable: each ``.bin``/``.idx`` pair of an indexed corpus, each JSONL
file, the tokenizer, the COGS and user pair files, and the ``checkpoint.init_from``
checkpoint. A missing input is one line naming the key and the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from sci_scale.checkpoint.index import RUN_STATE
from sci_scale.config import Config, ConfigError

# Settings that name a file or directory (``data.corpus_paths`` is a list of them).
PATH_KEYS = (
    ("run", "dir"),
    ("data", "cache_dir"),
    ("data", "tokenizer"),
    ("data", "cogs_path"),
    ("data", "user_pairs_path"),
    ("checkpoint", "init_from"),
)


def absolute(path: str, base: Path) -> str:
    """``path`` with ``~`` expanded, joined to ``base`` when relative, and normalised (symlinks
    are kept: a cluster's scratch link is what the job should see)."""
    expanded = Path(path).expanduser()
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def resolve_paths(cfg: Config, base: Path) -> Config:
    """``cfg`` with every path setting absolute against ``base`` (the submitting directory)."""
    sections = {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value is not None:
            sections.setdefault(section, {})[key] = absolute(value, base)
    data = {"corpus_paths": [absolute(p, base) for p in cfg.data.corpus_paths]}
    sections["data"] = {**sections.get("data", {}), **data}
    return cfg.replace(
        **{name: getattr(cfg, name).replace(**changes) for name, changes in sections.items()}
    )


def _require_readable(key: str, path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist ({what})")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ConfigError(f"{key}: {path} is not readable ({what})")


def check_inputs(cfg: Config) -> None:
    """Every input the run reads exists and is readable; a ConfigError names the first that is
    not. Call on a config whose paths are absolute (:func:`resolve_paths`)."""
    d = cfg.data
    for index, path in enumerate(d.corpus_paths):
        key = f"data.corpus_paths[{index}]"
        if d.corpus == "indexed":
            for suffix in (".bin", ".idx"):
                _require_readable(
                    key, Path(path + suffix), "a prefix written by sci-scale preprocess"
                )
        elif d.corpus == "jsonl":
            _require_readable(key, Path(path), "a JSONL corpus file")
            if Path(path).is_dir():
                raise ConfigError(f"{key}: {path} is a directory, not a JSONL file")
    if d.tokenizer is not None:
        _require_readable(
            "data.tokenizer", Path(d.tokenizer), "a sentencepiece .model or a model directory"
        )
    for key, value in (
        ("data.cogs_path", d.cogs_path),
        ("data.user_pairs_path", d.user_pairs_path),
    ):
        if value is not None:
            _require_readable(key, Path(value), "a pair file")
    init = cfg.checkpoint.init_from
    if init is not None:
        _require_readable("checkpoint.init_from", Path(init), "a checkpoint directory")
        if not (Path(init) / RUN_STATE).is_file():
            raise ConfigError(
                f"checkpoint.init_from: {init} is not a sci-scale checkpoint (no {RUN_STATE})"
            )
