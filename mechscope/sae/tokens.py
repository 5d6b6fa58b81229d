"""The vocabulary tokens each SAE latent's decoder direction points at: through the embedding and the unembedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm


@dataclass
class LatentTokens:
    """Top tokens of every latent, as decoded strings, best first.

    - ``top_input[i]``: the ``k`` tokens whose embedding rows ``W_E[t]`` have the largest dot product with ``W_dec[i]``
      (the tokens whose embeddings align most with the latent; the node table's ``top_10_tokens``).
    - ``top_output[i]``: the ``k`` tokens with the largest logit ``W_dec[i] @ W_U`` (what the latent promotes).
    """

    top_input: list[list[str]]
    top_output: list[list[str]]


def latent_tokens(
    W_dec: Tensor,  # noqa: N803 (the weights' usual names)
    W_E: Tensor,  # noqa: N803
    W_U: Tensor,  # noqa: N803
    tokenizer: Any,
    k: int = 10,
    batch_size: int = 1024,
) -> LatentTokens:
    """Top ``k`` input and output tokens of every latent (see ``LatentTokens``).

    ``W_dec [d_sae, d_in]``, ``W_E [d_vocab, d_in]``, ``W_U [d_in, d_vocab]``; the products are taken in float32 on
    ``W_E``'s device, ``batch_size`` latents at a time, so memory stays ``O(batch_size * d_vocab)``. A token id is
    decoded with ``tokenizer.batch_decode`` (one id per string), once however many latents it tops. ``k`` is capped
    at ``d_vocab``.
    """
    if W_dec.ndim != 2 or W_E.ndim != 2 or W_U.ndim != 2:
        shapes = [list(W_dec.shape), list(W_E.shape), list(W_U.shape)]
        raise ValueError(f"W_dec, W_E and W_U must be 2-d, got shapes {shapes}")
    d_in = W_dec.shape[1]
    if W_E.shape[1] != d_in or W_U.shape[0] != d_in:
        raise ValueError(
            f"W_dec {list(W_dec.shape)}, W_E {list(W_E.shape)} and W_U {list(W_U.shape)} disagree on d_in={d_in}"
        )
    device = W_E.device
    embed = W_E.detach().to(device, torch.float32)
    unembed = W_U.detach().to(device, torch.float32)
    k_in, k_out = min(k, embed.shape[0]), min(k, unembed.shape[1])
    top_in, top_out = [], []
    with torch.no_grad():
        for start in tqdm(range(0, W_dec.shape[0], batch_size), desc="top tokens", leave=False):
            block = W_dec[start : start + batch_size].detach().to(device, torch.float32)
            top_in.append((block @ embed.T).topk(k_in, dim=-1).indices.cpu())
            top_out.append((block @ unembed).topk(k_out, dim=-1).indices.cpu())
    ids_in = torch.cat(top_in) if top_in else torch.zeros(0, k_in, dtype=torch.long)
    ids_out = torch.cat(top_out) if top_out else torch.zeros(0, k_out, dtype=torch.long)
    unique = torch.unique(torch.cat([ids_in.flatten(), ids_out.flatten()])).tolist()
    text = dict(zip(unique, tokenizer.batch_decode([[t] for t in unique]), strict=True))
    return LatentTokens(
        top_input=[[text[t] for t in row] for row in ids_in.tolist()],
        top_output=[[text[t] for t in row] for row in ids_out.tolist()],
    )
