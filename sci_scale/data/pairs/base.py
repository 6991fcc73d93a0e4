"""The record every structural-pair generator yields, and the error they raise on bad input."""

from __future__ import annotations

from dataclasses import dataclass

from sci_scale.errors import UserError


@dataclass(frozen=True)
class Example:
    """One structural example.

    ``text`` is what the model sees (e.g. ``"IN: walk twice OUT: I_WALK I_WALK"``); ``template``
    is its structural template (e.g. ``"$V twice"``): examples sharing a template are positives
    for the structural contrastive loss. ``source`` names the generator (``"scan"``,
    ``"arithmetic"``, ``"cogs"``, ``"user"``). ``split`` is the side of the held-out boundary the
    example lies on: ``"train"`` for training material, anything else (``"test"``) for held-out
    material that must never be mixed into training blocks.
    """

    text: str
    template: str
    source: str
    split: str


class PairDataError(UserError, ValueError):
    """Bad input to a pair generator: an unknown name, a missing path, a malformed line.

    Errors about a line of a file name the file and the 1-based line number as ``path:line``.
    """


def where(path: object, lineno: int) -> str:
    """``path:line`` for error messages (``lineno`` is 1-based)."""
    return f"{path}:{lineno}"
