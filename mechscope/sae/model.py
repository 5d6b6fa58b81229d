"""``SparseAutoencoder`` (alias ``SAE``): ReLU, TopK, BatchTopK and JumpReLU SAEs in one readable module.

Encoding, for an input ``x [..., d_in]``::

    x_n      = normalise(x)                          # cfg.normalize_activations; identity by default
    pre_acts = (x_n - b_dec) @ W_enc + b_enc         # b_dec is subtracted only if cfg.apply_b_dec_to_input
    latents  = activation(pre_acts)                  # [..., d_sae], by cfg.architecture

    relu:      relu(pre_acts)
    topk:      relu of each token's k largest pre-activations, 0 elsewhere
    jumprelu:  relu(pre_acts) where pre_acts > threshold, 0 elsewhere
    batchtopk: in training mode, relu of the k * n_tokens largest pre-activations of the whole batch; in eval mode
               (what ``load`` returns) per token, like jumprelu, with the learnt ``threshold``, as SAELens and
               sparsify do at inference. Like BatchNorm, ``sae.train()`` / ``sae.eval()`` switch the two.

Decoding: ``reconstruction = denormalise(latents @ W_dec + b_dec)``. Each row of ``W_dec [d_sae, d_in]`` is one
latent's dictionary direction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mechscope.files import atomic_write
from mechscope.sae.config import DTYPES, SAEConfig, dtype_name
from mechscope.sae.formats import WriteFile, read_sae, write_saelens
from mechscope.sae.kernels import SparseDecode
from mechscope.sae.latents import SparseLatents

LAYER_NORM_EPS = 1e-5  # OpenAI sparse_autoencoder's LN (and SAELens's "layer_norm") divide by std + 1e-5


class InputStats(NamedTuple):
    """How an input was normalised: the reconstruction is mapped back as ``out * scale + shift``.

    Each is a float, or ``[..., 1]`` (one value per token) for the per-token normalisations.
    """

    shift: Tensor | float
    scale: Tensor | float


class SAEOutput(NamedTuple):
    """One pass through an SAE: ``pre_acts`` and ``latents [..., d_sae]``, ``reconstruction [..., d_in]``."""

    pre_acts: Tensor
    latents: Tensor
    reconstruction: Tensor


DESCRIPTIVE_FIELDS = frozenset({"model_name", "hook_name", "neuronpedia_id", "device"})  # no effect on the latents


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over ``d_in``-dimensional activations with ``d_sae`` latents (see the module docstring).

    Parameters: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, and for
    ``jumprelu`` a trainable ``threshold [d_sae]`` (for ``batchtopk`` the same-named buffer, estimated in training).
    A new SAE has unit-norm decoder rows, ``W_enc = W_dec.T`` and zero biases and thresholds.
    """

    threshold: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self._cfg = cfg
        dtype, device = cfg.torch_dtype, cfg.device
        w_dec = torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(w_dec)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone(memory_format=torch.contiguous_format))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=dtype, device=device))

    @property
    def cfg(self) -> SAEConfig:
        """The config, with ``dtype`` and ``device`` read from the weights (move the SAE with ``.to()``)."""
        return replace(self._cfg, dtype=dtype_name(self.W_enc.dtype), device=str(self.W_enc.device))

    @cfg.setter
    def cfg(self, cfg: SAEConfig) -> None:
        old = self._cfg
        if (cfg.d_in, cfg.d_sae, cfg.architecture) != (old.d_in, old.d_sae, old.architecture):
            raise ValueError(
                f"a new cfg must keep d_in={old.d_in}, d_sae={old.d_sae} and architecture={old.architecture!r} "
                f"(got {cfg.d_in}, {cfg.d_sae}, {cfg.architecture!r}): build a new SparseAutoencoder instead"
            )
        self._cfg = cfg

    @property
    def _topk(self) -> int:
        """``cfg.k`` of a topk SAE (SAEConfig makes it an int in [1, d_sae])."""
        k = self._cfg.k
        assert isinstance(k, int), "only topk SAEs have an int k"
        return k

    def extra_repr(self) -> str:
        cfg = self._cfg
        k = f", k={cfg.k}" if cfg.k is not None else ""
        return f"d_in={cfg.d_in}, d_sae={cfg.d_sae}, architecture={cfg.architecture!r}{k}"

    # ---- input normalisation -------------------------------------------------------------------------------

    def _input_stats(self, x: Tensor | None) -> InputStats | None:
        """``(shift, scale)`` of the normalisation of ``x [..., d_in]`` (each ``[..., 1]`` or a float), or None."""
        mode = self._cfg.normalize_activations
        if mode == "none":
            return None
        if mode == "expected_average_only_in":
            factor = self._cfg.scaling_factor
            assert factor is not None  # SAEConfig requires one for this normalisation
            return InputStats(0.0, 1.0 / factor)
        if x is None:
            raise ValueError(
                f"this SAE normalises each token (normalize_activations={mode!r}), so decoding needs the input that "
                "was encoded: pass x= to decode / decode_sparse, or use forward(x) / forward_with_latents(x)"
            )
        x = x.to(self.W_enc.dtype)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            return InputStats(mu, (x - mu).std(dim=-1, keepdim=True))
        return InputStats(0.0, x.norm(dim=-1, keepdim=True) / self._cfg.d_in**0.5)

    def _normalize(self, x: Tensor, stats: InputStats | None) -> Tensor:
        if stats is None:
            return x
        shift, scale = stats
        if self._cfg.normalize_activations == "layer_norm":
            return (x - shift) / (scale + LAYER_NORM_EPS)
        return x / scale

    @staticmethod
    def denormalize(out: Tensor, stats: InputStats | None) -> Tensor:
        """``out [..., d_in]`` mapped back to the input's scale: ``out * scale + shift`` (``out`` when ``stats`` is
        None), with ``stats`` from :meth:`encoder_input` / :meth:`pre_acts` of that input."""
        if stats is None:
            return out
        shift, scale = stats
        return out * scale + shift

    # ---- encoding --------------------------------------------------------------------------------------------

    def _checked(self, x: Tensor, width: str) -> Tensor:
        """``x`` itself, after checking it is a floating-point tensor whose last dimension is ``cfg.<width>``
        (``"d_in"`` for activations, ``"d_sae"`` for latents); a TypeError or ValueError naming both otherwise."""
        want = getattr(self._cfg, width)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"a tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                f"the SAE takes a floating-point tensor [..., {width}={want}], got {got}: cast it with .float()"
            )
        if x.ndim == 0 or x.shape[-1] != want:
            last = x.shape[-1] if x.ndim else "none (a scalar)"
            raise ValueError(
                f"the SAE takes [..., {width}={want}], got shape {tuple(x.shape)} (last dimension {last}); is this "
                f"the hook the SAE was trained on ({self._cfg.hook_name})?"
            )
        return x

    def encoder_input(self, x: Tensor) -> tuple[Tensor, InputStats | None]:
        """What multiplies ``W_enc``: ``x [..., d_in]`` cast to the SAE's dtype, normalised and minus ``b_dec`` (if
        ``cfg.apply_b_dec_to_input``), ``[..., d_in]``; and the input's :class:`InputStats` (None without a
        normalisation), which :meth:`denormalize` takes."""
        x = self._checked(x, "d_in").to(self.W_enc.dtype)
        stats = self._input_stats(x)
        x = self._normalize(x, stats)
        if self._cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, stats

    def pre_acts(self, x: Tensor) -> tuple[Tensor, InputStats | None]:
        """Pre-activations ``encoder_input(x) @ W_enc + b_enc`` ``[..., d_sae]`` of ``x [..., d_in]``, and the
        input's :class:`InputStats` (see :meth:`encoder_input`)."""
        x, stats = self.encoder_input(x)
        return x @ self.W_enc + self.b_enc, stats

    def activation(self, pre_acts: Tensor) -> Tensor:
        """Latents ``[..., d_sae]`` from pre-activations ``[..., d_sae]``, by architecture (module docstring)."""
        cfg = self._cfg
        if cfg.architecture == "relu":
            return pre_acts.relu()
        if cfg.architecture == "topk":
            values, indices = pre_acts.topk(self._topk, dim=-1, sorted=False)
            return torch.zeros_like(pre_acts).scatter_(-1, indices, values.relu())
        if cfg.architecture == "batchtopk" and self.training:
            assert cfg.k is not None  # SAEConfig requires it for batchtopk
            flat = pre_acts.relu().flatten()
            values, indices = flat.topk(int(cfg.k * pre_acts.shape[:-1].numel()), sorted=False)
            return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre_acts)
        return pre_acts.relu() * (pre_acts > self.threshold).to(pre_acts.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``[..., d_sae]`` of activations ``x [..., d_in]``."""
        return self.activation(self.pre_acts(x)[0])

    def encode_sparse(self, x: Tensor) -> SparseLatents:
        """The active latents of ``x [..., d_in]`` as ``(indices, values)``, each ``[..., k]``.

        For ``topk`` ``k`` is ``cfg.k``, and no dense latent tensor is built or scattered into (the pre-activations
        are the only ``[..., d_sae]`` tensor). For the other architectures
        the number of active latents varies per token: ``k`` is the largest count in ``x`` (at least 1), and
        tokens with fewer fill the rest with value 0 (at an arbitrary index), which decodes to nothing.
        """
        return self.sparse_activation(self.pre_acts(x)[0])

    def sparse_activation(self, pre_acts: Tensor) -> SparseLatents:
        """:meth:`activation` as :class:`SparseLatents`: ``indices, values [..., k]`` from ``pre_acts [..., d_sae]``
        (``k`` as in :meth:`encode_sparse`)."""
        if self._cfg.architecture == "topk":
            values, indices = pre_acts.topk(self._topk, dim=-1, sorted=False)
            return SparseLatents(indices, values.relu())
        return SparseLatents.from_dense(self.activation(pre_acts))

    # ---- decoding --------------------------------------------------------------------------------------------

    def decode(self, latents: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction ``[..., d_in]`` of ``latents [..., d_sae]``.

        ``x [..., d_in]``, the encoded input, is needed only by SAEs that normalise each token (``layer_norm``,
        ``constant_norm_rescale``), to scale the reconstruction back.
        """
        return self.denormalize(self._checked(latents, "d_sae") @ self.W_dec + self.b_dec, self._input_stats(x))

    def decode_sparse(self, indices: Tensor, values: Tensor, x: Tensor | None = None) -> Tensor:
        """``decode`` of sparse latents ``indices, values [..., k]`` (``encode_sparse``'s output), by embedding_bag."""
        return self.denormalize(self._sparse_decoder_out(indices, values), self._input_stats(x))

    def _sparse_decoder_out(self, indices: Tensor, values: Tensor) -> Tensor:
        k = indices.shape[-1]
        out = SparseDecode.apply(indices.reshape(-1, k), values.reshape(-1, k).to(self.W_dec.dtype), self.W_dec)
        return out.view(*indices.shape[:-1], self._cfg.d_in) + self.b_dec

    # ---- both ------------------------------------------------------------------------------------------------

    def forward_with_latents(self, x: Tensor) -> SAEOutput:
        """Pre-activations, latents ``[..., d_sae]`` and reconstruction ``[..., d_in]`` of ``x`` in one pass."""
        pre_acts, stats = self.pre_acts(x)
        latents = self.activation(pre_acts)
        return SAEOutput(pre_acts, latents, self.denormalize(latents @ self.W_dec + self.b_dec, stats))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` of ``x [..., d_in]``; TopK SAEs decode sparsely."""
        if self._cfg.architecture != "topk":
            return self.forward_with_latents(x).reconstruction
        pre_acts, stats = self.pre_acts(x)
        return self.denormalize(self._sparse_decoder_out(*self.sparse_activation(pre_acts)), stats)

    # ---- training helpers ------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of what the SAE's latents depend on: its config, less the fields that only describe it
        (:data:`DESCRIPTIVE_FIELDS`), and its parameters and buffers (their bytes, in name order). Stages that resume
        record it, so a retrained SAE in the same folder is noticed."""
        encoding = {k: v for k, v in asdict(self.cfg).items() if k not in DESCRIPTIVE_FIELDS}
        digest = hashlib.sha256(json.dumps(encoding, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every row of ``W_dec`` (every dictionary direction) to unit norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Remove from ``W_dec.grad`` each row's component along that ``W_dec`` row, in place.

        With unit-norm rows (``normalize_decoder_`` after every step) the optimiser then only turns directions.
        """
        grad = self.W_dec.grad
        if grad is None:
            raise RuntimeError("W_dec has no gradient yet: call backward() first")
        along = (grad * self.W_dec).sum(dim=-1, keepdim=True) / self.W_dec.pow(2).sum(dim=-1, keepdim=True)
        grad -= along * self.W_dec

    # ---- building and files ----------------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, Tensor]) -> SparseAutoencoder:
        """The SAE of ``cfg`` holding ``tensors``, as the readers of :mod:`mechscope.sae.formats` return them.

        ``tensors``: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
        ``jumprelu`` and ``batchtopk``, ``threshold [d_sae]``; cast to ``cfg.dtype`` (a tensor already in that dtype
        and contiguous is used as it is, not copied), on their own device. A missing, extra or misshapen entry
        raises. The SAE is in training mode, as every new module.
        """
        sae = cls(replace(cfg, device="meta"))
        sae.load_state_dict(
            {name: value.to(cfg.torch_dtype).contiguous() for name, value in tensors.items()}, assign=True
        )
        sae.cfg = cfg
        return sae

    @classmethod
    def load(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
    ) -> SparseAutoencoder:
        """Load the SAE at ``path`` in any supported format (``mechscope.sae.formats.detect_format``), in eval mode.

        ``dtype`` defaults to the stored dtype; ``device`` to the CPU, whatever the stored config says.
        """
        sae = cls.from_tensors(*read_sae(path)).to(device).eval()
        return sae if dtype is None else sae.to(DTYPES[dtype_name(dtype)])

    def save(self, path: str | Path, *, overwrite: bool = False, write_file: WriteFile = atomic_write) -> Path:
        """Write this SAE as a mechscope/SAELens directory (``cfg.json`` + ``sae_weights.safetensors``); returns
        ``path``. See :func:`mechscope.sae.formats.write_saelens` for the layout, ``overwrite`` and ``write_file``."""
        return write_saelens(self.cfg, self.state_dict(), path, overwrite=overwrite, write_file=write_file)


SAE = SparseAutoencoder
