"""Streaming per-latent selections of examples: the top activations, and uniform samples from activation bins.

An *example* is one token of the corpus, named by its ``context`` and ``position`` (the activation store's row
keys). Both selections see the active latents of a batch of tokens at a time and keep ``O(d_sae x k)`` numbers,
never a ``[tokens, d_sae]`` tensor. Both merge: the selection of a union of token sets is the merge of the
selections of its parts, whatever the order, so ranks of a data-parallel run can each select and one merges.

- :class:`TopExamples`: per latent, the ``k`` tokens with the largest activation (ties: the smaller
  ``(context, position)`` first).
- :class:`BinSamples`: per latent and activation bin ``(b/n, (b+1)/n] x max``, up to ``per_bin`` tokens drawn
  uniformly without replacement. The draw gives every (token, latent) a pseudo-random priority from a hash of
  the pair and keeps the highest, so it depends on the seed only, not on batch sizes, order or ranks.

Each gives its whole state as named tensors (``state()``) and is rebuilt from them (``from_state``), which is how a
run checkpoints and resumes (:mod:`mechscope.dashboards.pipeline`) and how a rank would ship its part to be merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mechscope.sae.latents import SparseLatents

EMPTY = -1  # context and position of an unfilled slot


@dataclass
class Selection:
    """Per group (a latent, or a latent's bin), up to ``k`` examples, best first.

    ``scores`` ``[groups, k]`` (float64; unfilled slots ``-inf``), ``values`` ``[groups, k]`` (float32; unfilled
    0), ``context`` and ``position`` ``[groups, k]`` (int64; unfilled slots :data:`EMPTY`).
    """

    scores: Tensor
    values: Tensor
    context: Tensor
    position: Tensor

    @classmethod
    def empty(cls, groups: int, k: int) -> Selection:
        return cls(
            torch.full((groups, k), float("-inf"), dtype=torch.float64),
            torch.zeros(groups, k),
            torch.full((groups, k), EMPTY, dtype=torch.long),
            torch.full((groups, k), EMPTY, dtype=torch.long),
        )

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def state(self) -> dict[str, Tensor]:
        """The four tensors by name (not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> Selection:
        """The selection :meth:`state` gave (copies of its tensors)."""
        return cls(**{f.name: state[f.name].clone() for f in fields(cls)})

    def filled(self) -> Tensor:
        """``[groups, k]`` bool: which slots hold an example."""
        return self.context != EMPTY

    def merge(self, other: Selection) -> Selection:
        """The best ``k`` of both, per group (ties: smaller ``(context, position)`` first)."""
        scores = torch.cat([self.scores, other.scores], dim=1)
        context = torch.cat([self.context, other.context], dim=1)
        position = torch.cat([self.position, other.position], dim=1)
        values = torch.cat([self.values, other.values], dim=1)
        order = _best_first(scores, context, position)[:, : self.k]
        return Selection(
            scores.gather(1, order), values.gather(1, order), context.gather(1, order), position.gather(1, order)
        )


def _best_first(scores: Tensor, context: Tensor, position: Tensor) -> Tensor:
    """``[groups, n]`` column order: by score descending, then context and position ascending (empty slots last)."""
    order = torch.argsort(position, dim=1, stable=True)
    order = order.gather(1, torch.argsort(context.gather(1, order), dim=1, stable=True))
    return order.gather(1, torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True))


def select(
    groups: Tensor, scores: Tensor, values: Tensor, context: Tensor, position: Tensor, n_groups: int, k: int
) -> Selection:
    """The best ``k`` of the candidates ``[m]`` in each of ``n_groups`` groups (``groups [m]`` int64 in
    ``0..n_groups-1``): highest ``scores`` first, ties by smaller ``(context, position)``."""
    out = Selection.empty(n_groups, k)
    if groups.numel() == 0:
        return out
    order = torch.argsort(position, stable=True)
    for key in (context, -scores, groups):  # stable sorts, least significant key first
        order = order[torch.argsort(key[order], stable=True)]
    g = groups[order]
    starts = torch.searchsorted(g, torch.arange(n_groups, device=g.device))
    rank = torch.arange(g.numel(), device=g.device) - starts[g]
    keep = rank < k
    slot = (g[keep], rank[keep])
    chosen = order[keep]
    out.scores[slot] = scores[chosen].double()
    out.values[slot] = values[chosen].float()
    out.context[slot] = context[chosen]
    out.position[slot] = position[chosen]
    return out


def active_entries(latents: SparseLatents, context: Tensor, position: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(latent, value, context, position)``, each ``[m]``: every active (value > 0) latent of ``latents [n, k]``
    with the keys ``context``, ``position`` ``[n]`` of its token."""
    active = latents.values > 0
    row = active.nonzero()[:, 0]
    return latents.indices[active], latents.values[active], context[row], position[row]


def activation_bin(latent: Tensor, value: Tensor, max_activation: Tensor, n_bins: int) -> Tensor:
    """``[m]`` bin of each activation ``value [m]`` of ``latent [m]`` among ``n_bins`` equal bins over
    ``(0, max_activation[latent]]``: ``b`` for ``value / max`` in ``(b/n, (b+1)/n]``."""
    frac = value.float() / max_activation[latent].float().clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.ceil(frac * n_bins).long() - 1).clamp(0, n_bins - 1)


def bin_edges(max_activation: Tensor, n_bins: int) -> Tensor:
    """``[d_sae, n_bins + 1]``: the edges of :func:`activation_bin`'s bins, from 0 to each max activation."""
    return max_activation.float()[:, None] * torch.linspace(0, 1, n_bins + 1)[None, :]


class TopExamples:
    """Per latent, the ``k`` tokens where it is most active: ``self.selection`` (``[d_sae, k]``, best first)."""

    def __init__(self, d_sae: int, k: int = 20):
        self.d_sae = d_sae
        self.selection = Selection.empty(d_sae, k)

    def update(self, latents: SparseLatents, context: Tensor, position: Tensor) -> None:
        """Take in a batch: ``latents [n, k]`` of tokens with keys ``context``, ``position`` ``[n]``."""
        latent, value, ctx, pos = active_entries(latents, context, position)
        batch = select(latent, value, value, ctx, pos, self.d_sae, self.selection.k)
        self.selection = self.selection.merge(batch)

    def merge(self, other: TopExamples) -> None:
        """Take in another rank's selection over other tokens."""
        self.selection = self.selection.merge(other.selection)

    def max_activation(self) -> Tensor:
        """``[d_sae]``: each latent's largest activation (0 for a latent never active)."""
        return self.selection.values[:, 0].clone()

    def state(self) -> dict[str, Tensor]:
        """The selection's tensors (``[d_sae, k]`` each)."""
        return self.selection.state()

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> TopExamples:
        """The examples :meth:`state` gave."""
        out = cls(*state["scores"].shape)
        out.selection = Selection.from_state(state)
        return out


_MASK = (1 << 62) - 1


def priority(context: Tensor, position: Tensor, latent: Tensor, seed: int) -> Tensor:
    """A pseudo-random ``[m]`` float64 in ``[0, 1)`` per (token, latent), from an integer hash of the triple and the
    seed: equal inputs give equal priorities on any machine and in any batch."""
    x = (context * 1_000_003 + position) * 2_147_483_647 + latent + seed * 0x9E3779B1
    for mult in (0xBF58476D1CE4E5B, 0x94D049BB133111E):  # splitmix-style rounds kept inside 62 bits
        x = (x ^ (x >> 31)) & _MASK
        x = (x * mult) & _MASK
    return (x >> 9).double() / float(1 << 53)


class BinSamples:
    """Per latent, ``n_bins`` equal-width activation bins over ``(0, max_activation]`` and up to ``per_bin`` tokens
    drawn uniformly from each: ``self.selection`` ``[d_sae * n_bins, per_bin]`` (group ``latent * n_bins + bin``),
    with each token's activation in ``values``, and ``self.counts [d_sae * n_bins]``, the tokens in each bin."""

    def __init__(self, max_activation: Tensor, n_bins: int = 5, per_bin: int = 5, seed: int = 0):
        self.max_activation = max_activation.float()
        self.d_sae, self.n_bins, self.seed = max_activation.numel(), n_bins, seed
        self.selection = Selection.empty(self.d_sae * n_bins, per_bin)
        self.counts = torch.zeros(self.d_sae * n_bins, dtype=torch.long)  # tokens in each (latent, bin)

    def bin_edges(self) -> Tensor:
        """``[d_sae, n_bins + 1]``: each latent's bin edges, from 0 to its max activation."""
        return bin_edges(self.max_activation, self.n_bins)

    def update(self, latents: SparseLatents, context: Tensor, position: Tensor) -> None:
        """Take in a batch, as :meth:`TopExamples.update`."""
        latent, value, ctx, pos = active_entries(latents, context, position)
        group = latent * self.n_bins + activation_bin(latent, value, self.max_activation, self.n_bins)
        self.counts += torch.bincount(group, minlength=self.counts.numel())
        scores = priority(ctx, pos, latent, self.seed)
        batch = select(group, scores, value, ctx, pos, self.d_sae * self.n_bins, self.selection.k)
        self.selection = self.selection.merge(batch)

    def merge(self, other: BinSamples) -> None:
        """Take in another rank's samples over other tokens (same max activations and seed)."""
        if (
            other.n_bins != self.n_bins
            or other.seed != self.seed
            or not torch.equal(other.max_activation, self.max_activation)
        ):
            raise ValueError("bin samples merge only under the same max activations, n_bins and seed")
        self.selection = self.selection.merge(other.selection)
        self.counts += other.counts

    def state(self) -> dict[str, Tensor]:
        """The selection's tensors, ``counts``, ``max_activation`` and the 0-d ``n_bins`` and ``seed``."""
        return {
            **self.selection.state(),
            "counts": self.counts,
            "max_activation": self.max_activation,
            "n_bins": torch.tensor(self.n_bins),
            "seed": torch.tensor(self.seed),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> BinSamples:
        """The samples :meth:`state` gave."""
        out = cls(state["max_activation"], int(state["n_bins"]), state["scores"].shape[1], int(state["seed"]))
        out.selection = Selection.from_state(state)
        out.counts = state["counts"].clone()
        return out
