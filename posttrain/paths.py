"""Paths: where posttrain keeps what it builds or computes once (tiny models, the offline SmolLM2 copy, eval
results), and what keeps a path from being a folder, checked before anything is written there."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of posttrain's caches: ``$POSTTRAIN_CACHE`` if set, else ``~/.cache/posttrain``."""
    env = os.environ.get("POSTTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posttrain"


def file_in_the_way(folder: Path) -> Path | None:
    """The file at ``folder`` or at one of its parents that keeps it from being a folder; None if there is none."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def not_a_folder(folder: Path) -> str | None:
    """`` is not a folder`` or `` is under FILE, which is not a folder`` when a file keeps ``folder`` from being a
    folder (to follow its name in a message); None when nothing does."""
    existing = file_in_the_way(folder)
    if existing is None:
        return None
    return " is not a folder" if existing == folder else f" is under {existing}, which is not a folder"
