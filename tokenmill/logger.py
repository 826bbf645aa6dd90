"""The ``tokenmill`` logger: INFO to stderr by default, level from TOKENMILL_LOG_LEVEL."""

from __future__ import annotations

import logging
import os


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("tokenmill")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s tokenmill: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("TOKENMILL_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
