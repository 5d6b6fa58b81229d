"""mechscope: mechanistic interpretability of transformer language models."""

from mechscope.models import Generation, HookedAutoConfig, HookedAutoModel, HookedConfig, HookedModel, HookPoint
from mechscope.models.cache import ActivationCache
from mechscope.models.factored import FactoredMatrix
from mechscope.models.names import get_act_name
from mechscope.sae import SAE, SparseAutoencoder
from mechscope.tools.experiments import BaseInterpretabilityBench, Experiment
from mechscope.tools.svd import SVDInterpreter

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "ActivationCache",
    "BaseInterpretabilityBench",
    "Experiment",
    "FactoredMatrix",
    "Generation",
    "HookPoint",
    "HookedAutoConfig",
    "HookedAutoModel",
    "HookedConfig",
    "HookedModel",
    "SVDInterpreter",
    "SparseAutoencoder",
    "get_act_name",
]
