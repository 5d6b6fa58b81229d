"""The tokens each latent's decoder direction promotes and suppresses most.

A latent ``i`` writes ``W_dec[i]`` into the residual stream. Its direct effect on the logits is taken as
``(W_dec[i] * w) @ W_U`` ``[d_vocab]``, where ``w`` is the final norm's multiplier (``model.ln_final_w``; Gemma's
effective ``1 + weight``): the norm's scale depends on the whole residual and is left out, and its bias and
``b_U`` add the same to every latent, so they are left out too. This is SAEDashboard's and Neuronpedia's "logit
effects" with the norm weight folded in (they use ``W_dec @ W_U`` on TransformerLens models whose weights are
already folded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogitEffects:
    """Per latent the ``n`` largest and smallest effects: ``top_values``/``top_tokens`` ``[d_sae, n]`` (descending)
    and ``bottom_values``/``bottom_tokens`` ``[d_sae, n]`` (ascending)."""

    top_values: Tensor
    top_tokens: Tensor
    bottom_values: Tensor
    bottom_tokens: Tensor


@torch.no_grad()
def logit_effects(
    W_dec: Tensor,  # noqa: N803 (the field's name)
    W_U: Tensor,  # noqa: N803
    norm_weight: Tensor | None = None,
    n: int = 10,
    chunk: int = 512,
) -> LogitEffects:
    """The ``n`` most positive and most negative entries of ``(W_dec * norm_weight) @ W_U`` per latent.

    ``W_dec [d_sae, d_model]``, ``W_U [d_model, d_vocab]``, ``norm_weight [d_model]`` (None: no final-norm
    multiplier). Rows are done ``chunk`` at a time, so memory is ``[chunk, d_vocab]``.
    """
    W_U = W_U.float()  # noqa: N806
    direction = W_dec.float() * (norm_weight.float() if norm_weight is not None else 1.0)
    n = min(n, W_U.shape[1])
    parts = []
    for start in range(0, direction.shape[0], chunk):
        effects = direction[start : start + chunk] @ W_U
        top = effects.topk(n, dim=1)
        bottom = effects.topk(n, dim=1, largest=False)
        parts.append((top.values, top.indices, bottom.values, bottom.indices))
    top_values, top_tokens, bottom_values, bottom_tokens = (torch.cat(p) for p in zip(*parts, strict=True))
    return LogitEffects(top_values, top_tokens, bottom_values, bottom_tokens)
