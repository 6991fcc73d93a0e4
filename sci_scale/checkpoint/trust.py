"""Whether this process may unpickle checkpoint files without restriction.

Off unless the user says otherwise (``--trust-checkpoint`` on the command line, which sets
``SCI_SCALE_TRUST_CHECKPOINT=1`` so that every rank a launcher starts, and every run a study
spawns, inherits the choice). Kept free of torch so the CLI can set it before anything loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

TRUST_ENV = "SCI_SCALE_TRUST_CHECKPOINT"


def checkpoints_trusted() -> bool:
    """True only when the user opted out of safe loading for this process tree."""
    return os.environ.get(TRUST_ENV, "") == "1"


@contextlib.contextmanager
def trusted_checkpoints() -> Iterator[None]:
    """Checkpoints trusted for the duration (a command, and every process it starts), then
    the environment as it was: a library caller running several commands keeps the default."""
    before = os.environ.get(TRUST_ENV)
    os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = before
