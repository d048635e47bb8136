"""Extraction stage: model adapters, forward hooks, noising and the HDF5 activation store.

Other stages read activations only through ``extraction.store`` (``open_store``). The names below are
imported on first use, so ``extraction.config`` (the plan, read by ``revelio extract --help``) and
``extraction.files`` load without torch or h5py.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"ActivationStore": "store", "open_store": "store", "get_adapter": "adapters", "ExtractionPlan": "config"}

__all__ = ["ActivationStore", "ExtractionPlan", "get_adapter", "open_store"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
