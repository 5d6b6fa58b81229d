"""mechscope: mechanistic interpretability of transformer language models."""

from mechscope._version import __version__
from mechscope.models import Generation, HookedAutoConfig, HookedAutoModel, HookedConfig, HookedModel, HookPoint
from mechscope.models.cache import ActivationCache
from mechscope.models.factored import FactoredMatrix
from mechscope.models.names import get_act_name
from mechscope.sae import SAE, SparseAutoencoder
from mechscope.tools.experiments import BaseInterpretabilityBench, Experiment
from mechscope.tools.svd import SVDInterpreter

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
    "__version__",
    "get_act_name",
]
