"""Whether this process may unpickle checkpoint files without restriction.

Off unless the user says otherwise (``--trust-checkpoint`` on the command line, which sets
``SCI_SCALE_TRUST_CHECKPOINT=1`` so that every rank a launcher starts, and every run a study
spawns, inherits the choice). Kept free of torch so the CLI can set it before anything loads.
"""

from __future__ import annotations

import os

TRUST_ENV = "SCI_SCALE_TRUST_CHECKPOINT"


def checkpoints_trusted() -> bool:
    """True only when the user opted out of safe loading for this process tree."""
    return os.environ.get(TRUST_ENV, "") == "1"


def trust_checkpoints() -> None:
    os.environ[TRUST_ENV] = "1"
