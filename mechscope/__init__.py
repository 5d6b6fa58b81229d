"""mechscope: mechanistic interpretability of transformer language models.

The names below are imported on first use (:mod:`mechscope._lazy`), so importing one module of the package, e.g.
``mechscope.cooccurrence.outputs``, does not import the model stack (torch, transformers) it does not need.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope._version import __version__

if TYPE_CHECKING:
    from mechscope.models import Generation, HookedAutoConfig, HookedAutoModel, HookedConfig, HookedModel, HookPoint
    from mechscope.models.cache import ActivationCache
    from mechscope.models.factored import FactoredMatrix
    from mechscope.models.names import get_act_name
    from mechscope.sae import SAE, SparseAutoencoder
    from mechscope.tools.experiments import BaseInterpretabilityBench, Experiment
    from mechscope.tools.svd import SVDInterpreter
else:
    __getattr__, __dir__ = lazy_exports(__name__)

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
