"""Tool "attention": attention patterns, top attended tokens, head ablation and head scores.

Patterns come from ``blocks.L.attn.hook_pattern`` ``[batch, head, query_pos, key_pos]``. Head ablation
replaces one head's ``blocks.L.attn.hook_z`` (zero, or its mean over batch and positions) with a hook, so
the model's weights are never edited. Previous-token and induction scores follow the usual definitions
(Olsson et al. 2022; TransformerLens / ARENA). See ``docs/tools/attention.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechscope.models.names import block_hook
from mechscope.models.tokenizer import Input
from mechscope.tools import BaseInterpretabilityTool
from mechscope.tools.inputs import as_tokens, check_head, check_layer, check_position

ABLATION_METHODS = ("zero", "mean")


def diagonal_score(pattern: torch.Tensor, offset: int, first_query: int) -> torch.Tensor:
    """Mean attention from query ``q`` to key ``q - offset`` over the batch and ``q >= first_query``.

    ``pattern [batch, head, q_pos, k_pos]`` → ``[head]``.
    """
    queries = torch.arange(first_query, pattern.shape[-2], device=pattern.device)
    if len(queries) == 0 or first_query < offset:
        raise ValueError(
            f"no query position q >= {first_query} has a key at q - {offset} in {pattern.shape[-2]} tokens"
        )
    return pattern[:, :, queries, queries - offset].float().mean(dim=(0, 2))


def repeated_tokens(
    model: Any, seq_len: int = 50, batch: int = 4, seed: int = 0, prepend_bos: bool = True
) -> torch.Tensor:
    """``[batch, (1 +) 2 * seq_len]``: ``[BOS?, r, r]`` with ``r`` ``seq_len`` distinct random tokens per row.

    The tokens of ``r`` are drawn without replacement from ``0..d_vocab-1`` minus the BOS token, so every
    token of the second copy has exactly one earlier occurrence.
    """
    gen = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError("this tokenizer has no BOS token; pass prepend_bos=False")
    rows = []
    for _ in range(batch):
        perm = torch.randperm(model.cfg.d_vocab, generator=gen)
        r = perm[perm != bos][:seq_len] if bos is not None else perm[:seq_len]
        rows.append(torch.cat([torch.tensor([bos] if prepend_bos else [], dtype=torch.long), r, r]))
    return torch.stack(rows).to(model.device)


def _parse_heads(model: Any, heads: tuple[int, int] | Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` from one ``(layer, head)`` pair or a list of them, ranges checked."""
    single = len(heads) == 2 and all(isinstance(x, int) for x in heads)
    pairs: list[object] = [heads] if single else list(heads)
    if not pairs:
        raise ValueError("no heads given: pass (layer, head) or a list of (layer, head) pairs")
    out: dict[int, list[int]] = {}
    for pair in pairs:
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"a head is a (layer, head) pair, got {pair!r}")
        layer, head = pair
        out.setdefault(check_layer(model, layer), []).append(check_head(model, head))
    return out


class AttentionTools(BaseInterpretabilityTool):
    """Attention patterns, top attended tokens, head ablation, previous-token and induction scores
    (tool ``"attention"``)."""

    # ---- patterns ----------------------------------------------------------------------------------
    def attention_patterns(self, input_ids: Input, layer: int | None = None) -> torch.Tensor:
        """Attention patterns: ``[batch, head, query_pos, key_pos]`` for one ``layer``, or
        ``[n_layers, batch, head, query_pos, key_pos]`` for every layer when ``layer`` is None.

        Row ``q`` of a head's pattern is the softmax of its masked scores: it sums to 1 over ``k <= q``.
        """
        layers = range(self.model.cfg.n_layers) if layer is None else [check_layer(self.model, layer)]
        names = [block_hook(i, "attn.hook_pattern") for i in layers]
        _, cache = self.model.run_with_cache(
            as_tokens(self.model, input_ids), names_filter=names, stop_at_layer=self.model.stop_layer_for(names)
        )
        patterns = torch.stack([cache[n] for n in names])
        return patterns if layer is None else patterns[0]

    def top_attended_tokens(
        self, input_ids: Input, layer: int, head: int | None = None, query_pos: int | None = None, k: int = 5
    ) -> dict[str, torch.Tensor]:
        """The ``k`` key positions each query attends to most, per head.

        Returns ``positions``, ``weights`` (the attention probabilities, descending) and ``token_ids``
        (the tokens at those positions), each ``[batch, head, query_pos, k]``; the ``head`` dimension is
        dropped when ``head`` is given, the ``query_pos`` one when ``query_pos`` is given. Queries with fewer
        than ``k`` visible keys list masked keys (weight 0) last.
        """
        tokens = as_tokens(self.model, input_ids)
        pattern = self.attention_patterns(tokens, layer)  # [batch, head, q, k]
        if head is not None:
            pattern = pattern[:, check_head(self.model, head)]
        if query_pos is not None:
            pattern = pattern[..., check_position(query_pos, tokens.shape[1], "query_pos"), :]
        if not 1 <= k <= tokens.shape[1]:
            raise ValueError(f"k={k} must be between 1 and the number of tokens, {tokens.shape[1]}")
        weights, positions = pattern.topk(k, dim=-1)
        index = positions.reshape(len(tokens), -1)
        token_ids = tokens.gather(1, index).reshape(positions.shape)
        return {"positions": positions, "weights": weights, "token_ids": token_ids}

    # ---- ablation ----------------------------------------------------------------------------------
    def ablation_hooks(
        self,
        heads: tuple[int, int] | Sequence[tuple[int, int]],
        method: str = "zero",
        reference_ids: Input | None = None,
    ) -> list[tuple[str, Any]]:
        """Forward hooks that ablate ``heads`` (``(layer, head)`` or a list of pairs) at ``hook_z``.

        ``"zero"`` sets the head's ``z [batch, pos, d_head]`` to 0; ``"mean"`` to its mean over batch and
        positions on ``reference_ids`` (a clean run, required for ``"mean"``). Pass the list to
        ``model.run_with_hooks`` or ``model.hooks`` to combine it with other hooks.
        """
        if method not in ABLATION_METHODS:
            raise ValueError(f"method={method!r}: use one of {ABLATION_METHODS}")
        by_layer = _parse_heads(self.model, heads)
        names = {layer: block_hook(layer, "attn.hook_z") for layer in by_layer}
        if method == "mean":
            if reference_ids is None:
                raise ValueError("method='mean' needs reference_ids: the inputs the mean of z is taken over")
            _, cache = self.model.run_with_cache(
                as_tokens(self.model, reference_ids),
                names_filter=list(names.values()),
                stop_at_layer=self.model.stop_layer_for(names.values()),
            )
            means = {layer: cache[names[layer]].mean(dim=(0, 1)) for layer in by_layer}  # [head, d_head]

        def make(layer: int, hs: list[int]):
            def ablate(z: torch.Tensor, hook) -> torch.Tensor:
                z = z.clone()
                z[:, :, hs] = 0 if method == "zero" else means[layer][hs].to(z.dtype)
                return z

            return ablate

        return [(names[layer], make(layer, hs)) for layer, hs in by_layer.items()]

    def ablate_heads(
        self,
        input_ids: Input,
        heads: tuple[int, int] | Sequence[tuple[int, int]],
        method: str = "zero",
        reference_ids: Input | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, pos, d_vocab]`` with ``heads`` ablated (see :meth:`ablation_hooks`).

        For ``"mean"``, ``reference_ids`` defaults to ``input_ids`` (the mean over this batch's positions).
        The model's parameters are not touched.
        """
        tokens = as_tokens(self.model, input_ids)
        reference = tokens if reference_ids is None and method == "mean" else reference_ids
        hooks = self.ablation_hooks(heads, method, reference)
        with torch.no_grad():
            return self.model.run_with_hooks(tokens, fwd_hooks=hooks)

    # ---- head scores -------------------------------------------------------------------------------
    def _scores(self, tokens: torch.Tensor, offset: int, first_query: int) -> torch.Tensor:
        names = [block_hook(i, "attn.hook_pattern") for i in range(self.model.cfg.n_layers)]
        _, cache = self.model.run_with_cache(tokens, names_filter=names, stop_at_layer=self.model.stop_layer_for(names))
        return torch.stack([diagonal_score(cache[n], offset, first_query) for n in names])

    def previous_token_scores(self, input_ids: Input) -> torch.Tensor:
        """``[n_layers, n_heads]``: mean attention from position ``i`` to ``i - 1`` over the batch and
        ``i = 1..pos-1``. A pure previous-token head scores 1."""
        return self._scores(as_tokens(self.model, input_ids), offset=1, first_query=1)

    def induction_scores(
        self, seq_len: int = 50, batch: int = 4, seed: int = 0, prepend_bos: bool = True
    ) -> torch.Tensor:
        """``[n_layers, n_heads]``: mean attention to the token after the previous occurrence of the
        current token, on :func:`repeated_tokens` ``[BOS?, r, r]``.

        For a query in the second copy at position ``q`` (``q = b + seq_len + i``, ``b`` = 1 with BOS), the
        previous occurrence of its token is at ``q - seq_len`` and the token after it at
        ``q - seq_len + 1``; the score averages that attention over the ``seq_len`` queries of the second
        copy and the batch. A perfect induction head scores 1.
        """
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be at least 2")
        tokens = repeated_tokens(self.model, seq_len, batch, seed, prepend_bos)
        return self._scores(tokens, offset=seq_len - 1, first_query=int(prepend_bos) + seq_len)
