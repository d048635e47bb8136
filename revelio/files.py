"""Crash-safe file writes shared by every stage: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on a clean exit rename it onto ``path``, on an error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, **kw: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; ``kw`` goes to ``json.dumps`` (e.g. default=str)."""
    return write_text_atomic(path, json.dumps(data, indent=2, **kw) + "\n")
