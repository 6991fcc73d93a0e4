"""``python -m sci_scale`` (and ``torchrun -m sci_scale train ...``)."""

import sys

from sci_scale.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
