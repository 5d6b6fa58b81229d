"""Hooked models: HF causal LMs with TransformerLens hook points."""

from mechscope.models.config import HookedConfig
from mechscope.models.hooked import Generation, HookedAutoModel, HookedModel
from mechscope.models.hooks import HookPoint
from mechscope.models.loading import HookedAutoConfig

__all__ = ["Generation", "HookPoint", "HookedAutoConfig", "HookedAutoModel", "HookedConfig", "HookedModel"]
