"""PCA of the subspace a subgraph of SAE latents spans, and the choice of subgraphs to run it on.

For one subgraph: collect the tokens on which any of its latents fires (up to ``max_examples``), rebuild the
subgraph's part of each token's activation from those latents' decoder rows, ``x_S = sum_{i in S} a_i W_dec[i]``,
and project it onto its first principal components.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.cooccurrence.graph import Subgraph
from mechscope.cooccurrence.records import SubspacePCA
from mechscope.sae.latents import LatentsLike, as_sparse


def pca_candidates(subs: list[Subgraph], sizes: Sequence[int], per_size: int, seed: int) -> dict[int, list[Subgraph]]:
    """For each size, up to ``per_size`` of the subgraphs with exactly that many latents, in id order; every one of
    them when ``per_size`` is 0 (as the reference's PCA script takes every subgraph of the sizes it lists).

    When there are more, they are drawn at random without replacement from a generator seeded with ``(seed, size)``,
    so the choice for one size does not depend on the other sizes asked for. A size without subgraphs maps to ``[]``.
    """
    if per_size < 0:
        raise ValueError(f"per_size must be at least 0 (0: all), got {per_size}")
    out = {}
    for size in sizes:
        pool = [s for s in subs if len(s.nodes) == size]
        if 0 < per_size < len(pool):
            picked = np.random.default_rng([seed, size]).choice(len(pool), size=per_size, replace=False)
            pool = [pool[k] for k in picked]
        out[size] = sorted(pool, key=lambda s: s.id)
    return out


def _batch_rows(batch: LatentsLike, d_sae: int) -> tuple[sp.csr_array, Tensor, Tensor]:
    """One batch of latents (dense or sparse, made :class:`~mechscope.sae.SparseLatents`) as ``(acts, top_value,
    top_index)``.

    ``acts`` is a float32 CSR ``[tokens, d_sae]`` of its nonzero activations (a latent listed twice is summed,
    padding zeros are dropped); ``top_value [tokens]`` and ``top_index [tokens]`` are each token's strongest listed
    latent (the lowest index among equals). A dense batch lists its nonzero latents, so wherever a latent is
    positive this is the strongest of all ``d_sae``.
    """
    latents = as_sparse(batch)
    indices = latents.indices.reshape(-1, latents.k).cpu()
    values = latents.values.detach().reshape(-1, latents.k).float().cpu()
    top_value = values.max(dim=-1).values
    top_index = torch.where(values == top_value[:, None], indices, torch.iinfo(indices.dtype).max).min(dim=-1).values
    rows = torch.arange(indices.shape[0])[:, None].expand_as(indices).reshape(-1)
    n_tokens = top_value.shape[0]
    acts = sp.csr_array(
        (values.reshape(-1).numpy(), (rows.numpy(), indices.reshape(-1).numpy())), shape=(n_tokens, d_sae)
    )
    acts.sum_duplicates()
    acts.eliminate_zeros()
    return acts, top_value, top_index


def _firing(acts: sp.csr_array | sp.csc_array, nodes: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [n], sub [n, len(nodes)])``: the first ``limit`` rows of ``acts [tokens, d_sae]`` on which any of
    ``nodes`` is ``> 0``, and the ``nodes``' activations there."""
    sub = sp.csr_array(acts[:, nodes])
    entries = sub.tocoo()
    rows = np.unique(entries.row[entries.data > 0])[:limit].astype(np.int64)
    return rows, sub[rows].toarray()


def _fit(
    nodes: np.ndarray,
    rows: np.ndarray,
    sub: np.ndarray,
    top_value: np.ndarray,
    top_index: np.ndarray,
    W_dec: Tensor,  # noqa: N803
    n_components: int,
) -> SubspacePCA:
    """PCA of ``sub [n, k] @ W_dec[nodes]`` for the tokens at ``rows`` (with their strongest latents).

    The reconstructions lie in the span of the ``k`` decoder rows, so with ``W_dec[nodes].T = Q R`` (reduced QR) the
    centred reconstructions are ``(sub_c @ R.T) @ Q.T``: the SVD of the small ``[n, k]`` factor gives the same
    principal components as that of the ``[n, d_in]`` reconstructions, at ``O(n k^2)`` cost.
    """
    if len(rows) <= n_components:
        raise ValueError(f"the subgraph fires on {len(rows)} tokens; PCA to {n_components} components needs more")
    sub_t = torch.from_numpy(sub).double()
    q, r = torch.linalg.qr(W_dec.detach()[torch.from_numpy(nodes)].double().cpu().T)
    factor = (sub_t - sub_t.mean(dim=0)) @ r.T
    u, s, vh = torch.linalg.svd(factor, full_matrices=False)
    vt = (q @ vh.T).T[:n_components]  # [c, d_in], c = min(n_components, rank of the factor's shape)
    largest = vt.abs().argmax(dim=1)
    sign = torch.sign(vt.gather(1, largest[:, None]))  # a deterministic sign per component
    vt, coords = vt * sign, u[:, : len(vt)] * s[: len(vt)] * sign.T
    pad = n_components - len(vt)
    total = (s**2).sum()
    ratio = s[: len(vt)] ** 2 / total if total > 0 else torch.zeros(len(vt), dtype=s.dtype)  # all points equal: 0
    return SubspacePCA(
        nodes=nodes.tolist(),
        token_index=rows.astype(np.int64),
        activations=sub.astype(np.float32),
        coords=torch.nn.functional.pad(coords, (0, pad)).float().numpy(),
        components=torch.nn.functional.pad(vt, (0, 0, 0, pad)).float().numpy(),
        explained_variance_ratio=torch.nn.functional.pad(ratio, (0, pad)).float().numpy(),
        top_value=top_value,
        top_index=top_index,
        top_in_subgraph=np.isin(top_index, nodes),
    )


def subgraph_pca(
    batches: Iterable[LatentsLike],
    nodes: Sequence[int],
    W_dec: Tensor,  # noqa: N803 (the SAE's name for it)
    max_examples: int = 5000,
    n_components: int = 3,
) -> SubspacePCA:
    """PCA of the subgraph ``nodes``' reconstructions ``activations @ W_dec[nodes]`` over the tokens where it fires.

    ``batches`` are latent activations, dense ``[..., d_sae]`` or sparse (``SparseLatents`` or ``(indices, values)``
    pairs ``[..., k]``, as for :func:`~mechscope.cooccurrence.count_cooccurrences`); ``W_dec [d_sae, d_in]``. A token
    counts when any subgraph latent is ``> 0`` on it; the first ``max_examples`` such tokens are used, and batches
    after them are not read.
    For many subgraphs over batches held in memory, :func:`subgraph_pcas` reads the batches once.
    """
    node_a = np.asarray(nodes, dtype=np.int64)
    kept: dict[str, list[np.ndarray]] = {"rows": [], "sub": [], "top_value": [], "top_index": []}
    seen = found = 0
    for batch in tqdm(batches, desc="subgraph tokens", unit="batch", leave=False):
        acts, top_value, top_index = _batch_rows(batch, W_dec.shape[0])
        rows, sub = _firing(acts, node_a, max_examples - found)
        kept["rows"].append(rows + seen)
        kept["sub"].append(sub)
        kept["top_value"].append(top_value.numpy()[rows])
        kept["top_index"].append(top_index.numpy()[rows])
        seen += acts.shape[0]
        found += len(rows)
        if found >= max_examples:
            break
    cat = {k: np.concatenate(v) if v else np.zeros((0, len(node_a))) for k, v in kept.items()}
    return _fit(node_a, cat["rows"], cat["sub"], cat["top_value"], cat["top_index"], W_dec, n_components)


def subgraph_pcas(
    batches: Sequence[LatentsLike],
    node_lists: Sequence[Sequence[int]],
    W_dec: Tensor,  # noqa: N803
    max_examples: int = 5000,
    n_components: int = 3,
) -> list[SubspacePCA | None]:
    """:func:`subgraph_pca` of each of ``node_lists``, reading ``batches`` once; ``None`` where a subgraph fires on
    too few tokens (at most ``n_components``).

    All batches become one CSC matrix ``[rows, d_sae]`` of their nonzero activations, so each subgraph costs a slice
    of its latents' columns and an SVD of a ``[n, len(nodes)]`` matrix, not a pass over every batch.
    """
    parts = [_batch_rows(b, W_dec.shape[0]) for b in tqdm(batches, desc="latent rows", unit="batch", leave=False)]
    acts = sp.vstack([p[0] for p in parts], format="csc")
    top_value = torch.cat([p[1] for p in parts]).numpy()
    top_index = torch.cat([p[2] for p in parts]).numpy()
    out: list[SubspacePCA | None] = []
    for nodes in tqdm(node_lists, desc="subgraph PCA", leave=False):
        node_a = np.asarray(nodes, dtype=np.int64)
        rows, sub = _firing(acts, node_a, max_examples)
        if len(rows) <= n_components:
            out.append(None)
            continue
        out.append(_fit(node_a, rows, sub, top_value[rows], top_index[rows], W_dec, n_components))
    return out
