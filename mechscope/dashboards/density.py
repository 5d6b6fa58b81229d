"""How often each latent fires, and the histogram of its non-zero activations; both streaming and mergeable, and
both give their state as tensors (``state()`` / ``from_state``, as :mod:`mechscope.dashboards.selection`'s do)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mechscope.dashboards.selection import activation_bin, bin_edges
from mechscope.sae.latents import SparseLatents


class FiringCounts:
    """Tokens seen (``n_tokens``) and, per latent, tokens where it is active (``counts [d_sae]``, int64)."""

    def __init__(self, d_sae: int):
        self.counts = torch.zeros(d_sae, dtype=torch.long)
        self.n_tokens = 0

    def update(self, latents: SparseLatents) -> None:
        """Take in ``latents [n, k]`` of ``n`` tokens."""
        active = latents.indices[latents.values > 0]
        self.counts += torch.bincount(active, minlength=self.counts.numel())
        self.n_tokens += latents.values.shape[0]

    def merge(self, other: FiringCounts) -> None:
        """Take in another rank's counts over other tokens."""
        self.counts += other.counts
        self.n_tokens += other.n_tokens

    def state(self) -> dict[str, Tensor]:
        """``counts`` and the 0-d ``n_tokens``."""
        return {"counts": self.counts, "n_tokens": torch.tensor(self.n_tokens)}

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> FiringCounts:
        """The counts :meth:`state` gave."""
        out = cls(state["counts"].numel())
        out.counts = state["counts"].clone()
        out.n_tokens = int(state["n_tokens"])
        return out

    def density(self) -> Tensor:
        """``[d_sae]`` fraction of tokens where each latent fires."""
        return self.counts.double() / max(self.n_tokens, 1)


class ActivationHistograms:
    """Per latent, counts of its non-zero activations in ``n_bins`` equal bins over ``(0, max_activation]``:
    ``counts [d_sae, n_bins]`` (bin ``b`` holds ``value / max`` in ``(b/n, (b+1)/n]``), ``edges()``
    ``[d_sae, n_bins + 1]``."""

    def __init__(self, max_activation: Tensor, n_bins: int = 40):
        self.max_activation = max_activation.float()
        self.n_bins = n_bins
        self.counts = torch.zeros(max_activation.numel(), n_bins, dtype=torch.long)

    def update(self, latents: SparseLatents) -> None:
        active = latents.values > 0
        latent, value = latents.indices[active], latents.values[active]
        b = activation_bin(latent, value, self.max_activation, self.n_bins)
        flat = torch.bincount(latent * self.n_bins + b, minlength=self.counts.numel())
        self.counts += flat.view_as(self.counts)

    def merge(self, other: ActivationHistograms) -> None:
        """Take in another rank's counts over other tokens (same max activations)."""
        if not torch.equal(other.max_activation, self.max_activation) or other.n_bins != self.n_bins:
            raise ValueError("histograms merge only over the same bins (max activations and n_bins)")
        self.counts += other.counts

    def edges(self) -> Tensor:
        return bin_edges(self.max_activation, self.n_bins)

    def state(self) -> dict[str, Tensor]:
        """``counts [d_sae, n_bins]`` and ``max_activation [d_sae]``."""
        return {"counts": self.counts, "max_activation": self.max_activation}

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> ActivationHistograms:
        """The histograms :meth:`state` gave."""
        out = cls(state["max_activation"], state["counts"].shape[1])
        out.counts = state["counts"].clone()
        return out
