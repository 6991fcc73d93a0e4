"""User-supplied structural examples from a JSONL file.

One JSON object a line, either a single example::

    {"text": "IN: fly twice OUT: I_FLY I_FLY", "template": "$V twice"}

or an anchor and its partner, which share the template (two examples)::

    {"anchor": "...", "partner": "...", "template": "frame-7"}

``"split"`` is optional (default ``"train"``); anything else (e.g. ``"test"``) marks held-out
material, which never enters training blocks. Blank lines are skipped; malformed JSON, a line
that is not an object, or a missing or non-string key raises :class:`PairDataError` naming
``path:line``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sci_scale.data.pairs.base import Example, PairDataError, where


def _string(obj: dict, key: str, loc: str) -> str:
    if key not in obj:
        raise PairDataError(f"{loc}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise PairDataError(f"{loc}: {key!r} must be a non-empty string, got {value!r}")
    return value


def user_examples(path: str | Path) -> list[Example]:
    """Every example of a user pairs JSONL file (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PairDataError(f"cannot read user pairs file {path}: {exc.strerror or exc}") from None
    out: list[Example] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        loc = where(path, lineno)
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PairDataError(f"{loc}: malformed JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise PairDataError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
        template = _string(obj, "template", loc)
        split = _string(obj, "split", loc) if "split" in obj else "train"
        if "text" in obj:
            texts = [_string(obj, "text", loc)]
        elif "anchor" in obj or "partner" in obj:
            texts = [_string(obj, "anchor", loc), _string(obj, "partner", loc)]
        else:
            raise PairDataError(f"{loc}: missing key 'text' (or 'anchor' and 'partner')")
        out += [Example(t, template, "user", split) for t in texts]
    return out
