"""Corpora, token packing and the activation store (names imported on first use: :mod:`mechscope._lazy`)."""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports

if TYPE_CHECKING:
    from mechscope.data.corpus import default_texts, iter_texts, pack_contexts
    from mechscope.data.store import ActivationStore
else:
    __getattr__, __dir__ = lazy_exports(__name__)

__all__ = ["ActivationStore", "default_texts", "iter_texts", "pack_contexts"]
