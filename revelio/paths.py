"""File names derived from data (sample ids, prompts, concept words, class and hook names).

Every such name goes through :func:`safe_name`, which turns any string into ONE path component
that stays inside the output folder: no separators, no ``..``, no leading dot, no NUL or control
characters, at most ``max_len`` bytes. A name that had to be changed gets a short hash of the
original appended, so two ids that differ only in what was replaced (``a/b`` and ``a:b``) still
get two files; :class:`UniqueNames` also separates exact duplicates within one output folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_LEN = 120  # bytes; leaves room for a suffix (.npz, .png, .tmp) under every file system's 255


def safe_name(text: object, *, max_len: int = MAX_LEN, tag_changes: bool = True) -> str:
    """``text`` as a single, portable path component (ASCII letters, digits, ``.``, ``_``, ``-``).

    Runs of other characters become ``-``; leading dots and dashes are dropped (no ``..``, no hidden
    file, no option-like name); the result is cut to ``max_len`` bytes. When anything changed and
    ``tag_changes`` is true, ``-`` plus the first 8 hex digits of the SHA-1 of the original is
    appended, so that different originals keep different names.
    """
    raw = str(text)
    name = _UNSAFE.sub("-", raw).lstrip(".-").rstrip("-") or "item"
    if name == raw and len(name) <= max_len:
        return name
    if not tag_changes:
        return name[:max_len].rstrip(".-") or "item"
    tag = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name[:max_len - 9].rstrip('.-') or 'item'}-{tag}"


class UniqueNames:
    """Safe names for the files of one output folder: :func:`safe_name`, then ``-2``, ``-3`` ... for repeats."""

    def __init__(self, **kw: object):
        self.kw = kw
        self.used: set[str] = set()

    def __call__(self, text: object) -> str:
        base = safe_name(text, **self.kw)  # type: ignore[arg-type]
        name, i = base, 1
        while name.lower() in self.used:  # case-insensitive file systems (macOS, Windows) too
            i += 1
            name = f"{base}-{i}"
        self.used.add(name.lower())
        return name


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name``, checked to lie directly inside ``folder`` (a last guard behind :func:`safe_name`)."""
    folder = Path(folder)
    path = folder / name
    if path.parent != folder or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} would leave the output folder {str(folder)!r}")
    return path
