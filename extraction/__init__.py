"""Extraction stage: model adapters, forward hooks, noising and the HDF5 activation store.

Other stages read activations only through ``extraction.store`` (``open_store``).
"""

from .adapters import get_adapter
from .store import ActivationStore, open_store

__all__ = ["ActivationStore", "get_adapter", "open_store"]
