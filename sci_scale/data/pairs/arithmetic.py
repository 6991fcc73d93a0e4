"""GSM8K-style arithmetic word problems from fixed templates.

Each template is a problem frame (its operations and their order) whose lexical fillers vary:
names, objects, numbers. Examples of one template share its name as their structural template,
so "Mia has 3 apples and buys 4 more" and "Omar has 12 pencils and buys 9 more" are positives.

The text is ``"Q: <problem> A: <equation>"``, e.g.
``"Q: Mia has 3 apples and buys 4 more. How many apples does Mia have now? A: 3 + 4 = 7"``.

Held-out material is whole templates: a fixed, seed-determined set of ``heldout_fraction`` of the
templates (independent of ``per_template`` and ``part``) forms the ``"test"`` part and never
appears in the ``"train"`` part, so evaluation measures transfer to unseen problem frames.
Everything is deterministic from ``seed`` (string-seeded ``random.Random``, no hash salt).
"""

from __future__ import annotations

import random

from sci_scale.data.pairs.arithmetic_templates import TEMPLATES
from sci_scale.data.pairs.base import Example, PairDataError


def heldout_templates(seed: int, heldout_fraction: float = 0.2) -> list[str]:
    """The templates held out for ``seed``: ``round(fraction * #templates)`` of them (at least one
    when the fraction is positive, and never all), chosen by ``seed`` alone."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise PairDataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    names = sorted(TEMPLATES)
    k = round(heldout_fraction * len(names))
    if heldout_fraction > 0:
        k = max(k, 1)
    k = min(k, len(names) - 1)
    return sorted(random.Random(f"arithmetic-heldout:{seed}").sample(names, k))


def format_arithmetic(problem: str, equation: str) -> str:
    return f"Q: {problem} A: {equation}"


def arithmetic_examples(
    per_template: int, seed: int, heldout_fraction: float = 0.2, part: str = "train"
) -> list[Example]:
    """``per_template`` distinct problems of every template of ``part``.

    ``part="train"`` gives the templates not held out; ``part="test"`` the held-out ones (see
    :func:`heldout_templates`). Each template's problems depend only on ``seed`` and the
    template's name, so adding a template or changing ``per_template`` leaves the others' first
    problems unchanged.
    """
    if part not in ("train", "test"):
        raise PairDataError(f"unknown arithmetic part {part!r}; valid parts: train, test")
    if per_template < 0:
        raise PairDataError(f"per_template must be >= 0, got {per_template}")
    held = set(heldout_templates(seed, heldout_fraction))
    out: list[Example] = []
    for name, make in TEMPLATES.items():
        if (name in held) != (part == "test"):
            continue
        rng = random.Random(f"arithmetic:{seed}:{name}")
        seen: set[str] = set()
        attempts = 0
        while len(seen) < per_template:
            attempts += 1
            if attempts > 100 * per_template + 100:
                raise PairDataError(
                    f"arithmetic template {name!r} cannot give {per_template} distinct problems"
                )
            text = format_arithmetic(*make(rng))
            if text in seen:
                continue
            seen.add(text)
            out.append(Example(text, name, "arithmetic", part))
    return out
