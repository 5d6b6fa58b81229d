"""``SparseLatents``: the one type for the active latents of an SAE, used by training, counting and PCA alike.

An SAE's latents ``[..., d_sae]`` are mostly zero; ``SparseLatents(indices, values)`` keeps only the active ones,
``indices [..., k]`` (int64) and ``values [..., k]``. Slots a token does not need hold value 0 (at an arbitrary
index), which decodes to nothing and is never active at a threshold >= 0. Dense latents enter through
:func:`as_sparse` (or :meth:`SparseLatents.from_dense`), so no consumer tells the two apart itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SparseLatents(NamedTuple):
    """The active latents of each token: ``indices [..., k]`` (int64) and ``values [..., k]``; unused slots hold 0."""

    indices: Tensor
    values: Tensor

    @classmethod
    def from_dense(cls, latents: Tensor) -> SparseLatents:
        """The nonzero entries of ``latents [..., d_sae]`` (ascending latent order); ``k`` is the largest count of a
        token (at least 1). One ``nonzero`` pass over the dense tensor, then work in the number of entries."""
        flat = latents.reshape(-1, latents.shape[-1])
        rows, cols = flat.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=flat.shape[0])
        k = max(int(counts.max()) if counts.numel() else 0, 1)
        slots = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        shape, lead = (flat.shape[0], k), latents.shape[:-1]
        indices = torch.zeros(shape, dtype=torch.int64, device=flat.device).index_put((rows, slots), cols)
        values = flat.new_zeros(shape).index_put((rows, slots), flat[rows, cols])
        return cls(indices.view(*lead, k), values.view(*lead, k))

    def to_dense(self, d_sae: int) -> Tensor:
        """``[..., d_sae]``: the values scattered to their indices (an index listed twice adds up)."""
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_add_(-1, self.indices, self.values)

    @property
    def k(self) -> int:
        """Slots per token."""
        return self.indices.shape[-1]


def as_sparse(latents: Tensor | SparseLatents | tuple[Tensor, Tensor]) -> SparseLatents:
    """``latents`` as :class:`SparseLatents`: dense ``[..., d_sae]`` tensors are converted, ``(indices, values)``
    pairs wrapped."""
    if isinstance(latents, Tensor):
        return SparseLatents.from_dense(latents)
    indices, values = latents
    return SparseLatents(torch.as_tensor(indices), values)


LatentsLike = Tensor | SparseLatents | tuple[Tensor, Tensor]  # what consumers accept and pass to as_sparse


def dense_width(latents: LatentsLike) -> int | None:
    """``d_sae`` of dense latents ``[..., d_sae]``; None for sparse ones, whose ``k`` slots do not tell it."""
    return latents.shape[-1] if isinstance(latents, Tensor) else None
