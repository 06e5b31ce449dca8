"""``python -m celery_redlock demo``: see :mod:`celery_redlock.demo`."""

from __future__ import annotations

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main(exiting=True))
