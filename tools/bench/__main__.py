"""``python -m tools.bench``: the training-step benchmark (see ``train_step.py``)."""

from __future__ import annotations

import sys

from tools.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main())
