"""Hooked models: HF causal LMs with TransformerLens hook points.

The names below are imported on first use (:mod:`mechscope._lazy`): ``mechscope.models.names`` alone does not import
transformers.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports

if TYPE_CHECKING:
    from mechscope.models.config import HookedConfig
    from mechscope.models.hooked import Generation, HookedAutoModel, HookedModel
    from mechscope.models.hooks import HookPoint
    from mechscope.models.loading import HookedAutoConfig
else:
    __getattr__, __dir__ = lazy_exports(__name__)

__all__ = ["Generation", "HookPoint", "HookedAutoConfig", "HookedAutoModel", "HookedConfig", "HookedModel"]
