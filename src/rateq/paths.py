"""Where rateq keeps converted models and other reusable artefacts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$RATEQ_CACHE` if set, else `~/.cache/rateq`. Created on first use."""
    root = os.environ.get("RATEQ_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "rateq"
    path.mkdir(parents=True, exist_ok=True)
    return path
