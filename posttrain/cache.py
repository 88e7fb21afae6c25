"""Where posttrain keeps what it builds or computes once: tiny models, the offline SmolLM2 copy, eval results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of posttrain's caches: ``$POSTTRAIN_CACHE`` if set, else ``~/.cache/posttrain``."""
    env = os.environ.get("POSTTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posttrain"
