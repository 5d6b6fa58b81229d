"""Subgraph PCA against an eigen-decomposition of the covariance written here, for dense and sparse batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.cooccurrence import Subgraph, pca_candidates, subgraph_pca, subgraph_pcas

D_SAE, D_IN = 30, 8
NODES = [3, 7, 12, 20]


def batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(2, 40, D_SAE, generator=g) - 1.0) for _ in range(3)]


def reference_pca(sub: np.ndarray, w_rows: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(components, coords, explained variance ratio)`` from an eigen-decomposition of the covariance."""
    recon = sub.astype(np.float64) @ w_rows.astype(np.float64)
    centred = recon - recon.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(eigenvalues)[::-1][:n_components]
    vs = eigenvectors[:, order].T
    vs = vs * np.sign(vs[np.arange(len(vs)), np.abs(vs).argmax(axis=1)])[:, None]
    return vs, centred @ vs.T, eigenvalues[order] / eigenvalues.sum()


def test_pca_matches_covariance_eigenvectors_and_sparse_matches_dense():
    torch.manual_seed(0)
    w_dec = torch.randn(D_SAE, D_IN)
    dense = batches()
    result = subgraph_pca(dense, NODES, w_dec, max_examples=150)

    acts = torch.cat([b.reshape(-1, D_SAE) for b in dense]).numpy().astype(np.float64)
    fires = np.flatnonzero((acts[:, NODES] > 0).any(axis=1))[:150]
    np.testing.assert_array_equal(result.token_index, fires)
    sub = acts[fires][:, NODES]
    np.testing.assert_allclose(result.activations, sub, rtol=1e-6)
    vs, coords, ratio = reference_pca(sub, w_dec.numpy()[NODES], 3)
    np.testing.assert_allclose(result.components, vs, atol=1e-5)
    np.testing.assert_allclose(result.coords, coords, atol=1e-4)
    np.testing.assert_allclose(result.explained_variance_ratio, ratio, rtol=1e-5)
    np.testing.assert_array_equal(result.top_index, acts[fires].argmax(axis=1))
    np.testing.assert_array_equal(result.top_in_subgraph, np.isin(acts[fires].argmax(axis=1), NODES))

    sparse = []
    for b in dense:
        values, indices = b.topk(D_SAE, dim=-1)  # every latent, padding zeros included
        sparse.append((indices, values))
    from_sparse = subgraph_pca(sparse, NODES, w_dec, max_examples=150)
    np.testing.assert_array_equal(from_sparse.token_index, result.token_index)
    np.testing.assert_allclose(from_sparse.coords, result.coords, atol=1e-5)
    np.testing.assert_array_equal(from_sparse.top_index, result.top_index)


def test_too_few_tokens_is_an_error():
    silent = [torch.zeros(5, D_SAE)]
    with pytest.raises(ValueError, match="fires on 0 tokens"):
        subgraph_pca(silent, NODES, torch.randn(D_SAE, D_IN))


def test_pca_candidates_are_a_seeded_sample_of_each_size_in_id_order():
    sizes = [2] * 10 + [3] * 2 + [1] * 5
    subs = [Subgraph(k, list(range(10 * k, 10 * k + n)), [], []) for k, n in enumerate(sizes)]
    chosen = pca_candidates(subs, [2, 3, 4], per_size=4, seed=7)
    assert sorted(chosen) == [2, 3, 4]
    assert chosen[4] == []
    assert [s.id for s in chosen[3]] == [10, 11]  # fewer than per_size: all of them
    ids = [s.id for s in chosen[2]]
    assert len(ids) == 4 and ids == sorted(set(ids)) and set(ids) <= set(range(10))
    assert [s.id for s in pca_candidates(subs, [2], per_size=4, seed=7)[2]] == ids  # same seed, other sizes asked
    draws = {tuple(s.id for s in pca_candidates(subs, [2], per_size=4, seed=seed)[2]) for seed in range(6)}
    assert len(draws) > 1  # the seed matters


def test_subgraph_pcas_match_one_at_a_time_and_pad_small_subspaces():
    torch.manual_seed(1)
    w_dec = torch.randn(D_SAE, D_IN)
    dense = batches(seed=2)
    for b in dense:
        b[..., 29] = 0  # latent 29 never fires
    sparse = [tuple(reversed(b.topk(8, dim=-1))) for b in dense]  # the 8 strongest latents per token
    node_lists = [NODES, [0, 5], [29]]
    for data in (dense, sparse):
        many = subgraph_pcas(data, node_lists, w_dec, max_examples=100)  # 100 > one batch of 80 tokens
        assert many[2] is None
        for nodes, got in zip(node_lists[:2], many[:2], strict=True):
            one = subgraph_pca(data, nodes, w_dec, max_examples=100)
            np.testing.assert_array_equal(got.token_index, one.token_index)
            np.testing.assert_allclose(got.coords, one.coords, atol=1e-5)
            np.testing.assert_array_equal(got.top_index, one.top_index)

    pair = subgraph_pcas(dense, [[0, 5]], w_dec, max_examples=100)[0]
    acts = torch.cat([b.reshape(-1, D_SAE) for b in dense]).numpy()
    fires = np.flatnonzero((acts[:, [0, 5]] > 0).any(axis=1))[:100]
    vs, coords, ratio = reference_pca(acts[fires][:, [0, 5]], w_dec.numpy()[[0, 5]], 2)
    np.testing.assert_allclose(pair.components[:2], vs, atol=1e-5)
    np.testing.assert_allclose(pair.coords[:, :2], coords, atol=1e-4)
    np.testing.assert_allclose(pair.explained_variance_ratio, [*ratio, 0.0], rtol=1e-5)
    assert np.all(pair.components[2] == 0) and np.all(pair.coords[:, 2] == 0)  # a 2-latent subspace has 2 dims
