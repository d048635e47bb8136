"""Crash-safe file writes shared by every stage: a crash leaves the old file or the new one, never half of one.

The implementation lives in ``extraction.files`` (every stage may import it; stages never import
``revelio``): atomic writes that respect the umask, one writer per output (lock files), clear errors
when the disk is full.
"""

from __future__ import annotations

from extraction.files import (OutputError, OutputLocked, WriteFailed, atomic_path, atomic_write, hold_output,
                              lock_owner, write_json_atomic, write_text_atomic)

__all__ = ["OutputError", "OutputLocked", "WriteFailed", "atomic_path", "atomic_write", "hold_output", "lock_owner",
           "write_json_atomic", "write_text_atomic"]
