"""The token window around each chosen example, and its latent's activation on every token of the window.

After the examples are chosen (:mod:`mechscope.dashboards.selection`), one more pass over the same batches fills,
for example ``e`` of latent ``latent[e]`` at ``(context[e], position[e])``, the tokens at positions
``position[e] - window .. position[e] + window`` of that context and the latent's activation on each. Positions
the store does not hold (before the context's start, after its end, special tokens the harvest left out) keep
token :data:`NO_TOKEN` and activation 0. Memory is ``[examples, 2 * window + 1]``.

Windows filled from different rows (ranks that each read a share of the chunks) merge; the state is tensors
(``state()`` / ``from_state``, as :mod:`mechscope.dashboards.selection`'s).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mechscope.dashboards.layout import NO_TOKEN
from mechscope.dashboards.selection import active_entries
from mechscope.sae.latents import SparseLatents


def _matches(sorted_keys: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs ``(i, j)`` with ``sorted_keys[j] == keys[i]`` (``sorted_keys`` ascending), as two ``[pairs]`` tensors."""
    lo = torch.searchsorted(sorted_keys, keys, side="left")
    hi = torch.searchsorted(sorted_keys, keys, side="right")
    counts = hi - lo
    i = torch.repeat_interleave(torch.arange(keys.numel(), device=keys.device), counts)
    first = torch.repeat_interleave(lo - (counts.cumsum(0) - counts), counts)
    return i, first + torch.arange(i.numel(), device=keys.device)


class Windows:
    """Windows of ``window`` tokens each side around the examples ``context``, ``position``, ``latent`` ``[E]``.

    ``tokens`` ``[E, 2 * window + 1]`` (int64, :data:`NO_TOKEN` where not stored) and ``activations``
    ``[E, 2 * window + 1]`` (float32): column ``window`` is the example's own token.
    """

    def __init__(self, context: Tensor, position: Tensor, latent: Tensor, window: int = 16):
        self.window = window
        self.context, self.position, self.latent = context.long(), position.long(), latent.long()
        width = 2 * window + 1
        self.tokens = torch.full((context.numel(), width), NO_TOKEN, dtype=torch.long)
        self.activations = torch.zeros(context.numel(), width)
        self._by_context, self._context_order = torch.sort(self.context, stable=True)
        span = int(self.context.max()) + 1 if self.context.numel() else 1
        self._span = span
        self._by_latent, self._latent_order = torch.sort(self.latent * span + self.context, stable=True)

    def _place(self, example: Tensor, position: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The examples ``example [p]`` whose window holds ``position [p]``: mask ``[p]`` and their columns."""
        offset = position - self.position[example] + self.window
        keep = (offset >= 0) & (offset <= 2 * self.window)
        return keep, example[keep], offset[keep]

    def update(self, latents: SparseLatents, context: Tensor, position: Tensor, tokens: Tensor) -> None:
        """Take in a batch: ``latents [n, k]``, and ``context``, ``position``, ``tokens`` ``[n]`` of its tokens."""
        context, position = context.long(), position.long()
        row, j = _matches(self._by_context, context)
        keep, example, column = self._place(self._context_order[j], position[row])
        self.tokens[example, column] = tokens[row[keep]].long()

        latent, value, ctx, pos = active_entries(latents, context, position)
        known = ctx < self._span
        latent, value, ctx, pos = latent[known], value[known], ctx[known], pos[known]
        entry, j = _matches(self._by_latent, latent * self._span + ctx)
        keep, example, column = self._place(self._latent_order[j], pos[entry])
        self.activations[example, column] = value[entry[keep]].float()

    def merge(self, other: Windows) -> None:
        """Take in windows of the same examples filled from other rows: a slot the other saw a token in takes its
        token and activation (a rank that reads a row sets both)."""
        same = all(torch.equal(getattr(self, n), getattr(other, n)) for n in ("context", "position", "latent"))
        if not same or other.window != self.window:
            raise ValueError("windows merge only over the same examples and window")
        seen = other.tokens != NO_TOKEN
        self.tokens = torch.where(seen, other.tokens, self.tokens)
        self.activations = torch.where(seen, other.activations, self.activations)

    def state(self) -> dict[str, Tensor]:
        """The examples' ``context``, ``position``, ``latent`` ``[E]``, the 0-d ``window``, and ``tokens``,
        ``activations`` ``[E, 2 * window + 1]``."""
        return {
            "context": self.context,
            "position": self.position,
            "latent": self.latent,
            "window": torch.tensor(self.window),
            "tokens": self.tokens,
            "activations": self.activations,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> Windows:
        """The windows :meth:`state` gave."""
        out = cls(state["context"], state["position"], state["latent"], int(state["window"]))
        out.tokens, out.activations = state["tokens"].clone(), state["activations"].clone()
        return out
