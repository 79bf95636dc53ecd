"""Where dvi keeps what it makes or downloads once: converted models, greedy-path caches, data sets.

Light on purpose (no torch): the command line resolves data paths before anything heavy is imported.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`DVI_CACHE_DIR`, default ~/.cache/dvi."""
    return Path(os.environ.get("DVI_CACHE_DIR") or Path.home() / ".cache" / "dvi").expanduser()
