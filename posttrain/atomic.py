"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every file posttrain writes that a later step reads (checkpoint manifests, method state, masks, run summaries, eval
results, filter reports) goes through ``write_atomic``: write a temporary file in the same folder, then
``os.replace`` it onto the target (atomic on POSIX within one file system). The temporary file is removed when the
write fails, so a failed write leaves the old file intact and no litter behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | os.PathLike, payload, indent: int = 2, default=None) -> Path:
    """``payload`` as JSON (and a final newline), written atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=default) + "\n")
