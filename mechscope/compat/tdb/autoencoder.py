"""Transformer Debugger's (and openai/sparse_autoencoder's) ``Autoencoder``, with their parameters and buffers.

``latents = activation((x - pre_bias) @ encoder.weight.T + latent_bias)``,
``reconstruction = latents @ decoder.weight.T + pre_bias``. ``encoder`` and ``decoder`` are ``nn.Linear`` layers
(``decoder`` is :class:`TiedTranspose` of the encoder when ``tied``), so ``encoder.weight`` is a parameter with its
own ``.grad``, and ``state_dict()`` has exactly the entries Transformer Debugger's strict ``load_state_dict``
expects. ``to_sae()`` / ``from_sae()`` convert to and from mechscope's
:class:`~mechscope.sae.model.SparseAutoencoder` for the rest of mechscope (splicing, co-occurrence, training).

Two places follow openai/sparse_autoencoder rather than Transformer Debugger's copy of the class: ``normalize=True``
(which ``from_state_dict`` sets for TopK files) normalises each input with ``(x - mean) / (std + 1e-5)`` before
encoding, and ``forward`` maps the reconstruction back (``* std + mean``). ``encode`` returns the latents alone, as
in Transformer Debugger (openai/sparse_autoencoder returns ``(latents, info)``); see ``docs/tdb.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.sae.formats import read_openai_state_dict
from mechscope.sae.model import LAYER_NORM_EPS, SparseAutoencoder

#: what a normalising autoencoder's ``preprocess`` returns besides the input: its ``mu`` and ``std``, ``[..., 1]``
Info = dict[str, torch.Tensor]


class TopK(nn.Module):
    """Keep each row's ``k`` largest pre-activations, passed through ``postact_fn``; every other latent is 0."""

    def __init__(self, k: int, postact_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.k = k
        self.postact_fn = postact_fn if postact_fn is not None else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_latents]`` -> ``[..., n_latents]``."""
        top = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, top.indices, self.postact_fn(top.values))

    def config(self) -> dict[str, Any]:
        """``{"k": k, "postact_fn": "ReLU"}``: the ``activation_state_dict`` of a TopK file."""
        return {"k": self.k, "postact_fn": type(self.postact_fn).__name__}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TopK:
        """The inverse of :meth:`config`."""
        if "k" not in config:
            raise ValueError(f"a TopK activation_state_dict needs 'k' (found {sorted(config)})")
        name = config.get("postact_fn", "ReLU")
        if name not in _POSTACT:
            raise ValueError(f"TopK postact_fn {name!r} is not supported; use one of {sorted(_POSTACT)}")
        return cls(int(config["k"]), _POSTACT[name]())


_POSTACT: dict[str, type[nn.Module]] = {"ReLU": nn.ReLU, "Identity": nn.Identity}
#: the ``activation`` strings of OpenAI state dicts
ACTIVATIONS: dict[str, type[nn.Module]] = {**_POSTACT, "TopK": TopK}


class TiedTranspose(nn.Module):
    """A decoder that is the transpose of ``linear`` (a bias-free encoder): ``weight`` is ``linear.weight.T``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight.t())


class Autoencoder(nn.Module):
    """A sparse autoencoder with the OpenAI interface (see the module docstring).

    Parameters: ``pre_bias [n_inputs]``, ``encoder.weight [n_latents, n_inputs]``, ``latent_bias [n_latents]``,
    ``decoder.weight [n_inputs, n_latents]``. Buffers: ``stats_last_nonzero`` (long), ``latents_activation_frequency``
    (ones) and ``latents_mean_square`` (zeros), each ``[n_latents]``. Like ``nn.Linear``, the weights start
    uniformly random and the biases at 0.
    """

    stats_last_nonzero: torch.Tensor
    latents_activation_frequency: torch.Tensor
    latents_mean_square: torch.Tensor

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tied: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.pre_bias = nn.Parameter(torch.zeros(n_inputs))
        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.activation = activation if activation is not None else nn.ReLU()
        self.decoder: nn.Linear | TiedTranspose = (
            TiedTranspose(self.encoder) if tied else nn.Linear(n_latents, n_inputs, bias=False)
        )
        self.normalize = normalize
        self.register_buffer("stats_last_nonzero", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("latents_activation_frequency", torch.ones(n_latents))
        self.register_buffer("latents_mean_square", torch.zeros(n_latents))

    @property
    def n_latents(self) -> int:
        return self.latent_bias.shape[0]

    @property
    def n_inputs(self) -> int:
        return self.pre_bias.shape[0]

    # ---- the arithmetic ----------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, Info]:
        """With ``normalize``: ``((x - mu) / (std + 1e-5), {"mu": mu, "std": std})`` per row of ``x [..., n_inputs]``
        (``std`` of ``x - mu``, unbiased, as openai/sparse_autoencoder's ``LN``); else ``(x, {})``."""
        if not self.normalize:
            return x, {}
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + LAYER_NORM_EPS), {"mu": mu, "std": std}

    def encode_pre_act(self, x: torch.Tensor, latent_slice: slice = slice(None)) -> torch.Tensor:
        """``(x - pre_bias) @ encoder.weight[latent_slice].T + latent_bias[latent_slice]``: ``[..., n_inputs]`` ->
        ``[..., n_selected]``, of ``x`` as given (no input normalisation, as in both OpenAI codes)."""
        return F.linear(x - self.pre_bias, self.encoder.weight[latent_slice], self.latent_bias[latent_slice])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., n_latents]`` of ``x [..., n_inputs]`` (normalised first when ``normalize``)."""
        return self.activation(self.encode_pre_act(self.preprocess(x)[0]))

    def decode(self, latents: torch.Tensor, info: Info | None = None) -> torch.Tensor:
        """``latents @ decoder.weight.T + pre_bias``: ``[..., n_latents]`` -> ``[..., n_inputs]``.

        For a normalising autoencoder this is the reconstruction of the *normalised* input, unless ``info`` (from
        :meth:`preprocess` of the input) is given: then it is scaled back, ``* std + mu``, as
        openai/sparse_autoencoder's ``decode(latents, info)``.
        """
        out = self.decoder(latents) + self.pre_bias
        if self.normalize and info:
            out = out * info["std"] + info["mu"]
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(latents_pre_act, latents [..., n_latents], reconstruction [..., n_inputs])``; the reconstruction is
        in the input's scale. Like both OpenAI codes it updates ``stats_last_nonzero`` (steps since each latent
        last fired in the batch)."""
        x, info = self.preprocess(x)
        pre = self.encode_pre_act(x)
        latents = self.activation(pre)
        with torch.no_grad():
            self.stats_last_nonzero *= (latents.reshape(-1, self.n_latents) == 0).all(dim=0).long()
            self.stats_last_nonzero += 1
        return pre, latents, self.decode(latents, info)

    # ---- state dicts -------------------------------------------------------------------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The OpenAI layout: the parameters and buffers, ``activation`` (its class name) and
        ``activation_state_dict`` (``{"k", "postact_fn"}`` for TopK, else ``{}``); loadable by Transformer
        Debugger's ``from_state_dict(strict=True)``, by :meth:`from_state_dict` and with ``torch.load(...,
        weights_only=True)``."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        state[prefix + "activation"] = type(self.activation).__name__
        config = self.activation.config() if isinstance(self.activation, TopK) else {}
        state[prefix + "activation_state_dict"] = config
        return state

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], strict: bool = True) -> Autoencoder:
        """Build from an OpenAI / Transformer Debugger state dict (``state_dict`` is not modified).

        TopK files get ``normalize=True``, as openai/sparse_autoencoder decides. With ``strict=True`` (the
        default, as in Transformer Debugger) a missing or unknown entry raises ``ValueError``; with ``strict=False``
        unknown entries are ignored and missing buffers keep their initial values. A TopK state dict's
        ``activation.k`` / ``activation.postact_fn`` entries (which the OpenAI classes write) are read as its
        ``activation_state_dict``.
        """
        state = dict(state_dict)
        name = state.pop("activation", "ReLU")
        activation_config = dict(state.pop("activation_state_dict", {}) or {})
        # the OpenAI classes' own state_dict() of a TopK autoencoder repeats its config as activation.k and
        # activation.postact_fn (which their strict load then rejects); read them as the config
        for key in [k for k in state if k.startswith("activation.")]:
            activation_config.setdefault(key.removeprefix("activation."), state.pop(key))
        if name not in ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; the state dict should name one of {ACTIVATIONS}")
        activation = TopK.from_config(activation_config) if name == "TopK" else ACTIVATIONS[name]()
        encoder = state.get("encoder.weight")
        if not isinstance(encoder, torch.Tensor) or encoder.ndim != 2:
            raise ValueError(
                f"an OpenAI autoencoder state dict needs a 2-d encoder.weight [n_latents, n_inputs] ({sorted(state)})"
            )
        tied = "decoder.linear.weight" in state
        n_latents, n_inputs = encoder.shape
        autoencoder = cls(n_latents, n_inputs, activation=activation, tied=tied, normalize=name == "TopK")
        autoencoder.to(dtype=encoder.dtype)
        own = super(Autoencoder, autoencoder).state_dict()
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if strict and (unknown or missing):
            raise ValueError(
                f"state dict does not match an Autoencoder({n_latents}, {n_inputs}"
                f"{', tied=True' if tied else ''}): missing {missing}, unknown {unknown}; pass strict=False to "
                "ignore unknown entries and keep the initial values of missing buffers"
            )
        for key in set(own) & set(state):
            if tuple(state[key].shape) != tuple(own[key].shape):
                raise ValueError(f"{key} has shape {list(state[key].shape)}, expected {list(own[key].shape)}")
        autoencoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return autoencoder

    # ---- mechscope's SAE ---------------------------------------------------------------------------
    def to_sae(self) -> SparseAutoencoder:
        """A mechscope :class:`SparseAutoencoder` with a copy of these weights (ReLU or TopK; ``normalize`` becomes
        ``normalize_activations="layer_norm"``). It computes the same latents and reconstruction as :meth:`forward`."""
        cfg, tensors = read_openai_state_dict(
            {k: v for k, v in self.state_dict().items() if not k.startswith("stats_")},
            source="Autoencoder",
            layer_norm=self.normalize,
        )
        return SparseAutoencoder.from_tensors(cfg, {k: v.clone() for k, v in tensors.items()})

    @classmethod
    def from_sae(cls, sae: SparseAutoencoder) -> Autoencoder:
        """An Autoencoder with a copy of a mechscope SAE's weights (``relu`` or ``topk``, ``b_dec`` subtracted from
        the input, no normalisation or ``layer_norm``)."""
        cfg = sae.cfg
        if cfg.architecture not in ("relu", "topk") or not cfg.apply_b_dec_to_input:
            raise ValueError(
                f"only relu and topk SAEs that subtract b_dec from their input have the OpenAI form (this one: "
                f"architecture={cfg.architecture!r}, apply_b_dec_to_input={cfg.apply_b_dec_to_input})"
            )
        if cfg.normalize_activations not in ("none", "layer_norm"):
            raise ValueError(
                f"normalize_activations={cfg.normalize_activations!r} has no OpenAI form ('none' or 'layer_norm')"
            )
        assert cfg.k is None or isinstance(cfg.k, int)  # SAEConfig makes a topk k an int
        activation = TopK(cfg.k) if cfg.architecture == "topk" and cfg.k is not None else nn.ReLU()
        out = cls(cfg.d_sae, cfg.d_in, activation=activation, normalize=cfg.normalize_activations == "layer_norm")
        out.to(dtype=sae.W_enc.dtype, device=sae.W_enc.device)
        with torch.no_grad():
            out.encoder.weight.copy_(sae.W_enc.T)
            out.decoder.weight.copy_(sae.W_dec.T)
            out.pre_bias.copy_(sae.b_dec)
            out.latent_bias.copy_(sae.b_enc)
        return out
