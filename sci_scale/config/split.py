"""``data.split``: the train/valid/test weights, read exactly as megatron-core reads them.

megatron's ``parse_and_normalize_split`` takes every run of ``[.0-9]`` in the string and pads
to three numbers with zeros, so ``abc`` becomes 0,0,0 and fails later as "cannot convert float
NaN to integer", ``-1,2,1`` silently loses its sign and ``1e-3`` becomes two numbers. Only what
megatron reads as written passes here, so the shares a run trains on are the ones in its config.
"""

from __future__ import annotations

import re

from sci_scale.config.errors import ConfigError

_WEIGHT = re.compile(r"\d+(?:\.\d*)?|\.\d+")
FORMAT = "one to three comma-separated non-negative numbers, the train,valid,test weights"
SHARES = ("training", "validation", "test")


def split_weights(split: str) -> list[float]:
    """The three weights (missing ones are 0, as megatron pads them), or a ConfigError."""
    parts = [part.strip() for part in split.split(",")]
    if len(parts) > 3 or not all(_WEIGHT.fullmatch(part) for part in parts):
        raise ConfigError(f"data.split must be {FORMAT} (e.g. 98,1,1), got {split!r}")
    weights = [float(part) for part in parts] + [0.0] * (3 - len(parts))
    if sum(weights) <= 0:
        raise ConfigError(f"data.split must have a positive weight, got {split!r}")
    return weights
