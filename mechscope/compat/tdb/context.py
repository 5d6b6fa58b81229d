"""Transformer Debugger's ``ModelContext`` / ``StandardModelContext`` and ``AutoencoderContext``.

Weights come from mechscope's weight views (``docs/weights_and_svd.md``), reshaped to Transformer Debugger's
standard shapes (heads first, then input, then output).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F

from mechscope.compat.tdb.autoencoder import Autoencoder
from mechscope.compat.tdb.transformer import Transformer, get_default_device
from mechscope.models.hooked import HookedModel


class Dimension(str, Enum):
    """Named dimensions of weights (Transformer Debugger's ``Dimension``, model-intrinsic members)."""

    MAX_CONTEXT_LENGTH = "max_context_length"
    RESIDUAL_STREAM_CHANNELS = "residual_stream_channels"
    VOCAB_SIZE = "vocab_size"
    ATTN_HEADS = "attn_heads"
    QUERY_AND_KEY_CHANNELS = "query_and_key_channels"
    VALUE_CHANNELS = "value_channels"
    MLP_ACTS = "mlp_acts"
    LAYERS = "layers"
    SINGLETON = "singleton"
    AUTOENCODER_LATENTS = "autoencoder_latents"


class WeightLocationType(str, Enum):
    """Weight tensors a :class:`ModelContext` can return (values as in Transformer Debugger)."""

    MLP_TO_HIDDEN = "mlp.to_hidden"
    MLP_TO_RESIDUAL = "mlp.to_residual"
    EMBEDDING = "embedding"
    UNEMBEDDING = "unembedding"
    POSITION_EMBEDDING = "position_embedding"
    ATTN_TO_QUERY = "attn.to_query"
    ATTN_TO_KEY = "attn.to_key"
    ATTN_TO_VALUE = "attn.to_value"
    ATTN_TO_RESIDUAL = "attn.to_residual"
    LAYER_NORM_GAIN_FINAL = "layer_norm_gain.final"
    LAYER_NORM_BIAS_FINAL = "layer_norm_bias.final"
    LAYER_NORM_GAIN_PRE_ATTN = "layer_norm_gain.pre_attn"
    LAYER_NORM_GAIN_PRE_MLP = "layer_norm_gain.pre_mlp"

    @property
    def has_no_layers(self) -> bool:
        """One tensor per model (``layer=None``) rather than one per layer."""
        return self in _NO_LAYERS

    @property
    def shape_spec(self) -> tuple[Dimension, ...]:
        return weight_shape_by_location_type[self]


_D = Dimension
_W = WeightLocationType
_NO_LAYERS = {_W.EMBEDDING, _W.UNEMBEDDING, _W.POSITION_EMBEDDING, _W.LAYER_NORM_GAIN_FINAL, _W.LAYER_NORM_BIAS_FINAL}

weight_shape_by_location_type: dict[WeightLocationType, tuple[Dimension, ...]] = {
    _W.POSITION_EMBEDDING: (_D.MAX_CONTEXT_LENGTH, _D.RESIDUAL_STREAM_CHANNELS),
    _W.EMBEDDING: (_D.VOCAB_SIZE, _D.RESIDUAL_STREAM_CHANNELS),
    _W.UNEMBEDDING: (_D.RESIDUAL_STREAM_CHANNELS, _D.VOCAB_SIZE),
    _W.ATTN_TO_QUERY: (_D.ATTN_HEADS, _D.RESIDUAL_STREAM_CHANNELS, _D.QUERY_AND_KEY_CHANNELS),
    _W.ATTN_TO_KEY: (_D.ATTN_HEADS, _D.RESIDUAL_STREAM_CHANNELS, _D.QUERY_AND_KEY_CHANNELS),
    _W.ATTN_TO_VALUE: (_D.ATTN_HEADS, _D.RESIDUAL_STREAM_CHANNELS, _D.VALUE_CHANNELS),
    _W.ATTN_TO_RESIDUAL: (_D.ATTN_HEADS, _D.VALUE_CHANNELS, _D.RESIDUAL_STREAM_CHANNELS),
    _W.MLP_TO_HIDDEN: (_D.RESIDUAL_STREAM_CHANNELS, _D.MLP_ACTS),
    _W.MLP_TO_RESIDUAL: (_D.MLP_ACTS, _D.RESIDUAL_STREAM_CHANNELS),
    _W.LAYER_NORM_GAIN_PRE_MLP: (_D.RESIDUAL_STREAM_CHANNELS,),
    _W.LAYER_NORM_GAIN_PRE_ATTN: (_D.RESIDUAL_STREAM_CHANNELS,),
    _W.LAYER_NORM_GAIN_FINAL: (_D.RESIDUAL_STREAM_CHANNELS,),
    _W.LAYER_NORM_BIAS_FINAL: (_D.RESIDUAL_STREAM_CHANNELS,),
}

# location -> mechscope weight view; per-layer views are indexed by the layer
_VIEW = {
    _W.MLP_TO_HIDDEN: "W_in",
    _W.MLP_TO_RESIDUAL: "W_out",
    _W.EMBEDDING: "W_E",
    _W.UNEMBEDDING: "W_U",
    _W.POSITION_EMBEDDING: "W_pos",
    _W.ATTN_TO_QUERY: "W_Q",
    _W.ATTN_TO_KEY: "W_K",
    _W.ATTN_TO_VALUE: "W_V",
    _W.ATTN_TO_RESIDUAL: "W_O",
    _W.LAYER_NORM_GAIN_FINAL: "ln_final_w",
    _W.LAYER_NORM_BIAS_FINAL: "ln_final_b",
    _W.LAYER_NORM_GAIN_PRE_ATTN: "ln1_w",
    _W.LAYER_NORM_GAIN_PRE_MLP: "ln2_w",
}


class ModelContext(ABC):
    """A model's weights, dimensions and tokenizer behind Transformer Debugger's interface.

    Subclasses provide :meth:`get_or_create_model`; :class:`StandardModelContext` is the mechscope one.
    """

    def __init__(self, model_name: str, device: torch.device) -> None:
        self.model_name = model_name
        self.device = device

    @abstractmethod
    def get_or_create_model(self) -> Transformer:
        """The model whose weights and tokenizer this context serves."""

    def get_dim_size(self, dim: Dimension) -> int:
        cfg = self.get_or_create_model().cfg
        sizes = {
            _D.MAX_CONTEXT_LENGTH: cfg.n_ctx,
            _D.RESIDUAL_STREAM_CHANNELS: cfg.d_model,
            _D.VOCAB_SIZE: cfg.d_vocab,
            _D.ATTN_HEADS: cfg.n_heads,
            _D.QUERY_AND_KEY_CHANNELS: cfg.d_head,
            _D.VALUE_CHANNELS: cfg.d_head,
            _D.MLP_ACTS: cfg.d_mlp,
            _D.LAYERS: cfg.n_layers,
            _D.SINGLETON: 1,
        }
        if dim not in sizes:
            raise ValueError(f"{dim} is not a dimension of the model")
        return sizes[dim]

    def get_shape_from_spec(self, spec: tuple[Dimension, ...]) -> tuple[int, ...]:
        return tuple(self.get_dim_size(d) for d in spec)

    def get_weight(
        self,
        location_type: WeightLocationType,
        layer: int | None = None,
        normalize_dim: Dimension | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """The weight at ``location_type`` (of ``layer`` for per-layer weights) in the shape of
        ``weight_shape_by_location_type``, detached; ``normalize_dim`` L2-normalises along that dimension.

        Attention weights are ``[heads, d_model, d_head]`` (query/key/value; grouped-query keys and values
        repeated per query head) and ``[heads, d_head, d_model]`` (to residual); MLP ``[d_model, d_mlp]`` (the
        up projection for gated MLPs) and ``[d_mlp, d_model]``; embedding ``[n_vocab, d_model]``, unembedding
        ``[d_model, n_vocab]``, position embedding ``[n_context, d_model]`` (learned positions only); norm gains
        ``[d_model]`` (the effective multiplier, ``1 + weight`` for Gemma).
        """
        location_type = WeightLocationType(location_type)
        n_layers = self.n_layers
        if location_type.has_no_layers != (layer is None):
            which = "takes no layer" if location_type.has_no_layers else f"needs a layer in 0..{n_layers - 1}"
            raise ValueError(f"{location_type.name} {which} (got layer={layer})")
        if layer is not None and not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range 0..{n_layers - 1}")
        weight = getattr(self.get_or_create_model().model, _VIEW[location_type])
        if layer is not None:
            weight = weight[layer]
        spec = weight_shape_by_location_type[location_type]
        if normalize_dim is not None:
            weight = F.normalize(weight, dim=spec.index(normalize_dim))
        expected = self.get_shape_from_spec(spec)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{location_type.name}: expected shape {expected}, got {tuple(weight.shape)}")
        return weight.detach().to(device or self.device)

    def encode(self, string: str) -> list[int]:
        return self.get_or_create_model().enc.encode(string)

    def decode(self, token_list: list[int]) -> str:
        return self.get_or_create_model().enc.decode(token_list)

    def decode_token(self, token: int) -> str:
        return self.decode([token])

    def decode_token_list(self, token_list: list[int]) -> list[str]:
        """Each token as its own string."""
        return [self.decode_token(t) for t in token_list]

    def encode_token_str(self, token_str: str) -> int:
        tokens = self.encode(token_str)
        if len(tokens) != 1:
            raise ValueError(f"{token_str!r} encodes to {tokens}; wanted exactly 1 token")
        return tokens[0]

    def encode_token_str_list(self, token_str_list: list[str]) -> list[int]:
        return [self.encode_token_str(s) for s in token_str_list]

    @property
    def n_layers(self) -> int:
        return self.get_dim_size(_D.LAYERS)

    @property
    def n_neurons(self) -> int:
        return self.get_dim_size(_D.MLP_ACTS)

    @property
    def n_attention_heads(self) -> int:
        return self.get_dim_size(_D.ATTN_HEADS)

    @property
    def n_residual_stream_channels(self) -> int:
        return self.get_dim_size(_D.RESIDUAL_STREAM_CHANNELS)

    @property
    def n_vocab(self) -> int:
        return self.get_dim_size(_D.VOCAB_SIZE)

    @property
    def n_context(self) -> int:
        return self.get_dim_size(_D.MAX_CONTEXT_LENGTH)


class StandardModelContext(ModelContext):
    """A :class:`ModelContext` over a mechscope model: ``model_name`` is anything
    :meth:`Transformer.load` accepts, or pass an already loaded ``model`` (a ``Transformer`` or ``HookedModel``).
    The model is loaded on first use and cached."""

    def __init__(
        self, model_name: str, device: torch.device | None = None, model: Transformer | HookedModel | None = None
    ) -> None:
        super().__init__(model_name, device if device is not None else get_default_device())
        self._cached_transformer = Transformer(model) if isinstance(model, HookedModel) else model

    def get_or_create_model(self) -> Transformer:
        if self._cached_transformer is None:
            self._cached_transformer = Transformer.load(self.model_name, device=self.device)
        return self._cached_transformer


@dataclass(frozen=True)
class AutoencoderConfig:
    """Which autoencoder file (OpenAI state dict) to use at each layer, for activations at ``dst``
    (a name such as ``"mlp_post_act"`` or ``"resid_delta_mlp"``)."""

    dst: str
    autoencoder_path_by_layer_index: dict[int | None, str | Path]


#: the state-dict entries of an Autoencoder with one row per latent (the tied decoder's weight is the encoder's)
_PER_LATENT_ROWS = (
    "encoder.weight",
    "decoder.linear.weight",
    "latent_bias",
    "stats_last_nonzero",
    "latents_activation_frequency",
    "latents_mean_square",
)


@dataclass(frozen=True)
class AutoencoderContext:
    """One :class:`Autoencoder` per layer for one activation location, loaded lazily and cached.

    With ``omit_dead_latents=True``, :meth:`warmup` drops, from every autoencoder, as many latents as the
    autoencoder with the fewest dead latents has (dead: ``latents_activation_frequency < 1e-8``). As in
    Transformer Debugger, the *last* latents are dropped, so every kept latent keeps its index.
    """

    autoencoder_config: AutoencoderConfig
    device: torch.device = field(default_factory=get_default_device)
    omit_dead_latents: bool = False
    _cache: dict[int | None, Autoencoder] = field(default_factory=dict)

    @property
    def dst(self) -> str:
        return self.autoencoder_config.dst

    @property
    def layer_indices(self) -> set[int | None]:
        return set(self.autoencoder_config.autoencoder_path_by_layer_index)

    def get_autoencoder(self, layer_index: int | None) -> Autoencoder:
        """The frozen autoencoder of ``layer_index`` (loaded with ``torch.load(weights_only=True)``)."""
        if layer_index not in self._cache:
            path = self.autoencoder_config.autoencoder_path_by_layer_index.get(layer_index)
            if path is None:
                layers = sorted(self.layer_indices, key=lambda i: -1 if i is None else i)
                raise ValueError(f"no autoencoder for layer {layer_index}; layers: {layers}")
            state = torch.load(path, map_location=self.device, weights_only=True)
            autoencoder = Autoencoder.from_state_dict(state, strict=False).to(self.device)
            autoencoder.requires_grad_(False)
            self._cache[layer_index] = autoencoder
        return self._cache[layer_index]

    @property
    def num_autoencoder_directions(self) -> int:
        """Latents per autoencoder (after :meth:`warmup`, which may drop dead ones)."""
        if not self._cache:
            raise ValueError("num_autoencoder_directions is not populated yet; call warmup() first")
        return next(iter(self._cache.values())).n_latents

    def warmup(self) -> None:
        """Load every autoencoder; with ``omit_dead_latents`` drop the common number of dead latents."""
        for layer in self.layer_indices:
            self.get_autoencoder(layer)
        if not self.omit_dead_latents:
            return
        n_dead = min(int((ae.latents_activation_frequency < 1e-8).sum()) for ae in self._cache.values())
        if n_dead == 0:
            return
        keep = self.num_autoencoder_directions - n_dead
        for layer, ae in self._cache.items():
            state = ae.state_dict()
            for name in _PER_LATENT_ROWS:
                if name in state:
                    state[name] = state[name][:keep]
            if "decoder.weight" in state:  # untied: [n_inputs, n_latents]
                state["decoder.weight"] = state["decoder.weight"][:, :keep]
            self._cache[layer] = Autoencoder.from_state_dict(state).to(self.device).requires_grad_(False)
