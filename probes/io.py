"""Result files written atomically (temp file in the same folder, then rename): CSV and JSON tables."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extraction.files import atomic_write


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(text)
    return path


def _clean(v: Any) -> Any:
    """JSON-safe values: NaN -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def write_csv(path: str | Path, records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """One row per record; list values are joined with ';'. Columns default to every key, in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: ";".join(str(x) for x in _clean(v)) if isinstance(v, (list, tuple)) else _clean(v)
                    for k, v in r.items()})
    return write_text(path, buf.getvalue())
