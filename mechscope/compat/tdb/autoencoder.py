"""Transformer Debugger's (and openai/sparse_autoencoder's) ``Autoencoder``, backed by a mechscope SAE.

``latents = activation((x - pre_bias) @ encoder.weight.T + latent_bias)``,
``reconstruction = latents @ decoder.weight.T + pre_bias``. The arithmetic is mechscope's
:class:`~mechscope.sae.model.SparseAutoencoder`; this class gives it the OpenAI names and return values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechscope.sae.io import openai_state_dict_to_sae
from mechscope.sae.model import SparseAutoencoder

_OPENAI_KEYS = (
    "encoder.weight",
    "decoder.weight",
    "decoder.linear.weight",
    "pre_bias",
    "latent_bias",
    "activation",
    "activation_state_dict",
    "stats_last_nonzero",
    "latents_activation_frequency",
    "latents_mean_square",
)


class _Linear:
    """``.weight`` of the OpenAI ``encoder`` ``[n_latents, n_inputs]`` / ``decoder`` ``[n_inputs, n_latents]``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


class Autoencoder(nn.Module):
    """A sparse autoencoder with the OpenAI interface, wrapping ``sae`` (``xf.sae`` is the mechscope SAE).

    ``latents_activation_frequency`` ``[n_latents]`` comes from the state dict when it has one (ones
    otherwise, as in Transformer Debugger); :class:`~mechscope.compat.tdb.AutoencoderContext` uses it to find dead
    latents.
    """

    latents_activation_frequency: torch.Tensor  # a buffer, [n_latents]

    def __init__(self, sae: SparseAutoencoder, latents_activation_frequency: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sae = sae
        freq = latents_activation_frequency
        self.register_buffer(
            "latents_activation_frequency",
            torch.ones(sae.cfg.d_sae) if freq is None else freq.detach().float().clone(),
        )

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], strict: bool = True) -> Autoencoder:
        """Build from an OpenAI state dict (``encoder.weight [n_latents, n_inputs]``, ``decoder.weight
        [n_inputs, n_latents]``, ``pre_bias``, ``latent_bias``, ``activation``, ``activation_state_dict``, optional
        statistics). TopK files normalise each input first, as openai/sparse_autoencoder does. With
        ``strict=False`` unknown entries are ignored; with ``strict=True`` they raise. ``state_dict`` is not modified.
        """
        state = dict(state_dict) if strict else {k: v for k, v in state_dict.items() if k in _OPENAI_KEYS}
        return cls(openai_state_dict_to_sae(state), state.get("latents_activation_frequency"))

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The OpenAI layout (plain tensors and strings), loadable by :meth:`from_state_dict` and ``torch.load(...,
        weights_only=True)``. Inside another module's ``state_dict`` (``destination`` given) the entries are added
        to ``destination`` under ``prefix``; tensors are always detached copies (``keep_vars`` is ignored)."""
        cfg = self.sae.cfg
        state: dict[str, Any] = {
            "pre_bias": self.pre_bias.detach().clone(),
            "latent_bias": self.latent_bias.detach().clone(),
            "encoder.weight": self.encoder.weight.detach().clone(),
            "decoder.weight": self.decoder.weight.detach().clone(),
            "latents_activation_frequency": self.latents_activation_frequency.clone(),
            "activation": "TopK" if cfg.architecture == "topk" else "ReLU",
            "activation_state_dict": {"k": cfg.k, "postact_fn": "ReLU"} if cfg.architecture == "topk" else {},
        }
        if destination is None:
            return state
        destination.update({prefix + key: value for key, value in state.items()})
        return destination

    @property
    def n_latents(self) -> int:
        return self.sae.cfg.d_sae

    @property
    def pre_bias(self) -> torch.Tensor:
        """``[n_inputs]`` (mechscope's ``b_dec``)."""
        return self.sae.b_dec

    @property
    def latent_bias(self) -> torch.Tensor:
        """``[n_latents]`` (mechscope's ``b_enc``)."""
        return self.sae.b_enc

    @property
    def encoder(self) -> _Linear:
        """``encoder.weight`` ``[n_latents, n_inputs]`` = ``W_enc.T`` (a view)."""
        return _Linear(self.sae.W_enc.T)

    @property
    def decoder(self) -> _Linear:
        """``decoder.weight`` ``[n_inputs, n_latents]`` = ``W_dec.T`` (a view)."""
        return _Linear(self.sae.W_dec.T)

    def encode_pre_act(self, x: torch.Tensor, latent_slice: slice = slice(None)) -> torch.Tensor:
        """``(x - pre_bias) @ encoder.weight[latent_slice].T + latent_bias[latent_slice]``: ``[..., n_inputs]``
        -> ``[..., n_selected]``, without input normalisation (as in OpenAI's code)."""
        return (x - self.pre_bias) @ self.sae.W_enc[:, latent_slice] + self.latent_bias[latent_slice]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., n_latents]`` of ``x [..., n_inputs]`` (TopK autoencoders normalise ``x`` first)."""
        return self.sae.encode(x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents @ decoder.weight.T + pre_bias``: ``[..., n_latents]`` -> ``[..., n_inputs]``.

        For an autoencoder with input normalisation (TopK) this is the normalised reconstruction, as OpenAI's
        ``decode(latents)`` without ``info``; :meth:`forward` returns it mapped back to the input's scale.
        """
        return latents @ self.sae.W_dec + self.pre_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(latents_pre_act [..., n_latents], latents [..., n_latents], reconstruction [..., n_inputs])``."""
        out = self.sae.forward_with_latents(x)
        return out.pre_acts, out.latents, out.reconstruction
