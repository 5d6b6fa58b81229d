"""The sparse autograd pieces of SAEs: sparse decoding, the products behind its gradients, and the
straight-through estimators of training.

- :class:`SparseDecode`: ``dense_latents @ W`` from each token's ``k`` (index, value) pairs, forward and backward
  touching only those rows of ``W`` (TopK's decoder in ``sae(x)``, ``decode_sparse`` and training).
- :func:`gathered_dot` and :func:`scatter_outer`: the entries of ``rows @ table.T`` at given indices, and the
  transposed product of a sparse ``[n, m]`` matrix with ``rows``; on CPU by the loops of :mod:`mechscope.sae.loops`
  (two to three times faster than torch's CSR kernels there), elsewhere through torch's CSR kernels.
- :func:`top_indices`: each row's top-k columns, optionally among some columns only (TopK's and AuxK's selections),
  on CPU by selection (``loops.top_indices``), elsewhere by ``torch.topk``.
- :class:`SelectedPreActs`: the pre-activations a TopK step selected, with gradients through those entries only.
- :class:`JumpReLU` and :class:`Step`: JumpReLU and its step function with the rectangle-kernel straight-through
  estimators of Rajamanoharan et al. 2024 (:func:`rectangle`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import mechscope.sae.loops as loops


class SparseDecode(torch.autograd.Function):
    """``out[t] = sum_s values[t, s] * W[indices[t, s]]`` for ``indices, values [n, k]`` and ``W [m, d]``: ``[n, d]``.

    The same as ``dense_latents @ W`` with ``dense_latents [n, m]`` zero outside ``indices`` (an index repeated
    within a row adds up); forward and backward touch only the ``k`` rows of ``W`` each token uses (embedding_bag's
    own backward is slow on CPU).
    """

    @staticmethod
    def forward(ctx: Any, indices: Tensor, values: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(indices, values, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        indices, values, weight = ctx.saved_tensors
        grad_values = gathered_dot(grad, weight, indices) if ctx.needs_input_grad[1] else None
        grad_weight = scatter_outer(indices, values, grad, len(weight)) if ctx.needs_input_grad[2] else None
        return None, grad_values, grad_weight


def gathered_dot(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """``out[t, s] = rows[t] · table[indices[t, s]]`` for ``rows [n, d]``, ``table [m, d]`` and ``indices [n, k]``:
    the entries of ``rows @ table.T`` at ``indices``, computed only there."""
    dtype = _compute_dtype(rows.dtype)
    if rows.is_cpu:
        return loops.gathered_dot(rows.to(dtype), table.to(dtype), indices).to(rows.dtype)
    return _gathered_dot_csr(rows.to(dtype), table.to(dtype), indices).to(rows.dtype)


def _gathered_dot_csr(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """:func:`gathered_dot` by torch's sampled CSR product (any device)."""
    n, k = indices.shape
    ordered, order = indices.sort(dim=-1)  # a CSR row needs its columns in order
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    pattern = _csr(crow, ordered.flatten(), rows.new_zeros(n * k), (n, len(table)))
    dots = torch.sparse.sampled_addmm(pattern, rows, table.T, beta=0.0).values().view(n, k)
    return torch.empty_like(dots).scatter_(-1, order, dots)


def scatter_outer(indices: Tensor, weights: Tensor, rows: Tensor, m: int) -> Tensor:
    """``out [m, d]``: ``out[j] = sum of weights[t, s] * rows[t] over the (t, s) with indices[t, s] = j``, for
    ``indices, weights [n, k]`` and ``rows [n, d]``; that is ``dense_weights.T @ rows``, computed entry by entry."""
    dtype = _compute_dtype(rows.dtype)
    if rows.is_cpu:
        crow, order = loops.column_order(indices, m)
        return loops.scatter_outer(crow, order, indices.shape[1], weights.to(dtype), rows.to(dtype)).to(rows.dtype)
    return _scatter_outer_csr(indices, weights.to(dtype), rows.to(dtype), m).to(rows.dtype)


def _scatter_outer_csr(indices: Tensor, weights: Tensor, rows: Tensor, m: int) -> Tensor:
    """:func:`scatter_outer` by torch's CSR product (any device)."""
    n, k = indices.shape
    flat, order = indices.flatten().sort(stable=True)
    crow = torch.zeros(m + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=m).cumsum(0)
    matrix = _csr(crow, order // k, weights.flatten()[order], (m, n))
    return matrix @ rows


def top_indices(scores: Tensor, k: int, among: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``[n, k]``: the columns of the ``k`` largest values in each row of ``scores [n, m]`` plus ``bias [m]`` (in no
    promised order), only among the columns where the boolean ``among [m]`` is True when given (it must hold at
    least ``k``)."""
    if scores.is_cpu:
        columns = None if among is None or bool(among.all()) else among.nonzero().flatten()
        return loops.top_indices(scores.to(_compute_dtype(scores.dtype)), k, columns, bias)
    if bias is not None:
        scores = scores + bias
    if among is not None:
        scores = scores.masked_fill(~among, float("-inf"))
    return scores.topk(k, dim=-1, sorted=False).indices


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (numba's loops and torch's CPU CSR products lack them), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix, without torch's once-per-process warning that CSR support is "beta" (it works on CPU)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class SelectedPreActs(torch.autograd.Function):
    """``out[t, s] = products[t, indices[t, s]] + b_enc[indices[t, s]]``, the pre-activations at ``indices``, where
    ``products = encoder_input @ W_enc`` was computed without a graph (and without the bias, whose broadcast would
    cost a pass over ``[batch, d_sae]``); the backward pass sends gradients through these ``[batch, k]`` entries
    only.

    ``indices [batch, k]`` may repeat a latent within a row (TopK and AuxK both picking it); gradients then add up.
    """

    @staticmethod
    def forward(
        ctx: Any, encoder_input: Tensor, w_enc: Tensor, b_enc: Tensor, indices: Tensor, products: Tensor
    ) -> Tensor:
        ctx.save_for_backward(encoder_input, w_enc, indices)
        return products.gather(-1, indices) + b_enc[indices]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        encoder_input, w_enc, indices = ctx.saved_tensors
        d_sae = w_enc.shape[1]
        grad_input = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # each token's selected W_enc columns, weighted by their gradients
            grad_input = F.embedding_bag(indices, w_enc.T.contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = scatter_outer(indices, grad, encoder_input, d_sae).T
        if ctx.needs_input_grad[2]:
            grad_b = grad.new_zeros(d_sae).index_add_(0, indices.flatten(), grad.flatten())
        return grad_input, grad_w, grad_b, None, None


class JumpReLU(torch.autograd.Function):
    """``z * H(z - θ)`` for ``pre_acts z [..., d_sae]`` and ``threshold θ [d_sae]``; d/dz = H(z - θ),
    d/dθ = -(θ/ε) rect((z - θ)/ε) with ``ε`` the bandwidth (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_acts, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre_acts > threshold).to(grad.dtype)
        grad_threshold = -(threshold / eps) * rectangle((pre_acts - threshold) / eps) * grad
        return grad_pre, grad_threshold.sum_to_size(threshold.shape), None


class Step(torch.autograd.Function):
    """``H(z - θ)`` for ``pre_acts z [..., d_sae]`` and ``threshold θ [d_sae]``; d/dz = 0,
    d/dθ = -(1/ε) rect((z - θ)/ε) with ``ε`` the bandwidth (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_acts, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre_acts - threshold) / eps) * grad
        return torch.zeros_like(pre_acts), grad_threshold.sum_to_size(threshold.shape), None


def rectangle(u: Tensor) -> Tensor:
    """``rect(u)``: 1 where ``|u| < 1/2``, 0 elsewhere, in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)
