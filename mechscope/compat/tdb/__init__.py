"""Transformer Debugger's ``neuron_explainer.models`` API on top of mechscope (see ``docs/tdb.md``).

``Transformer`` wraps a :class:`~mechscope.models.hooked.HookedModel` (there is no second transformer);
``Autoencoder`` has the OpenAI parameters and converts to and from a
:class:`~mechscope.sae.model.SparseAutoencoder` (``to_sae`` / ``from_sae``).
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports

if TYPE_CHECKING:
    from mechscope.compat.tdb.autoencoder import Autoencoder, TiedTranspose, TopK
    from mechscope.compat.tdb.context import (
        AutoencoderConfig,
        AutoencoderContext,
        Dimension,
        ModelContext,
        StandardModelContext,
        WeightLocationType,
        weight_shape_by_location_type,
    )
    from mechscope.compat.tdb.hooks import (
        AtLayers,
        AttentionHooks,
        AutoencoderHooks,
        ConditionalHooks,
        FwdBwdHooks,
        HookCollection,
        Hooks,
        MLPHooks,
        NormalizationHooks,
        ResidualStreamHooks,
        ResidualStreamTorsoHooks,
        TransformerHooks,
    )
    from mechscope.compat.tdb.transformer import Encoding, HiddenState, Transformer, get_default_device, nucleus_sample
else:
    __getattr__, __dir__ = lazy_exports(__name__)

__all__ = [
    "AtLayers",
    "AttentionHooks",
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderContext",
    "AutoencoderHooks",
    "ConditionalHooks",
    "Dimension",
    "Encoding",
    "FwdBwdHooks",
    "HiddenState",
    "HookCollection",
    "Hooks",
    "MLPHooks",
    "ModelContext",
    "NormalizationHooks",
    "ResidualStreamHooks",
    "ResidualStreamTorsoHooks",
    "StandardModelContext",
    "TiedTranspose",
    "TopK",
    "Transformer",
    "TransformerHooks",
    "WeightLocationType",
    "get_default_device",
    "nucleus_sample",
    "weight_shape_by_location_type",
]
