"""Tool "superposition" against covariances, eigenvectors and mixtures written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.tools.superposition import SuperpositionDisentangler, fast_ica


@pytest.fixture(scope="module")
def tool(llama) -> SuperpositionDisentangler:
    return SuperpositionDisentangler(llama)


def _by_hand_cov(rows: torch.Tensor) -> torch.Tensor:
    x = rows.double()
    centred = x - x.sum(0) / x.shape[0]
    return centred.T @ centred / (x.shape[0] - 1)


def test_covariance_over_every_token_of_every_sequence(tool, llama):
    g = torch.Generator().manual_seed(3)
    batch, single = torch.randint(0, 50256, (2, 7), generator=g), torch.randint(0, 50256, (5,), generator=g)
    texts = ["ab", "a longer text"]  # a ragged batch: the padding must be left out
    ids_list = [batch, single, texts]
    layer = "blocks.0.hook_resid_post"
    sequences = [batch[0], batch[1], single, *(llama.to_tokens(t)[0] for t in texts)]
    with torch.no_grad():
        rows = torch.cat([llama.run_with_cache(s[None], names_filter=layer)[1][layer][0] for s in sequences])
    assert rows.shape[0] == 7 + 7 + 5 + 2 + 13
    cov = tool.compute_activation_covariance(ids_list, layer)
    torch.testing.assert_close(cov.double(), _by_hand_cov(rows), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tool.collect_activations(ids_list, layer), rows, atol=1e-5, rtol=1e-4)


def test_later_blocks_do_not_run(tool, llama):
    calls = []
    mlp1 = llama.model.model.layers[1].mlp
    handle = mlp1.register_forward_hook(lambda *a: calls.append(1))
    try:
        tool.compute_activation_covariance([torch.arange(6)], "layers.0.self_attn.hook_result_post")
        tool.compute_activation_covariance([torch.arange(6)], "blocks.0.mlp.hook_post")
        assert calls == []
        tool.compute_activation_covariance([torch.arange(6)], "blocks.1.hook_mlp_out")
        assert calls == [1]
    finally:
        handle.remove()


def test_hook_z_features_are_flattened(tool, llama):
    tokens = torch.arange(8)[None]
    cov = tool.compute_activation_covariance([tokens], "blocks.1.attn.hook_z")
    with torch.no_grad():
        z = llama.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")[1]["blocks.1.attn.hook_z"]
    assert cov.shape == (llama.cfg.n_heads * llama.cfg.d_head,) * 2
    torch.testing.assert_close(cov.double(), _by_hand_cov(z.reshape(8, -1)), atol=1e-6, rtol=1e-4)


def test_pca_directions_are_the_top_eigenvectors(tool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = _by_hand_cov(x)
    directions, ratios = tool.disentangle_superposition(cov, n_concepts=3, return_ratios=True)
    assert directions.shape == (6, 3)
    eigenvalues = np.sort(np.linalg.eigvalsh(cov.numpy()))[::-1]
    for i in range(3):
        v = directions[:, i]
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(cov @ v, eigenvalues[i] * v)  # an eigenvector, of the i-th largest eigenvalue
        assert float(ratios[i]) == pytest.approx(eigenvalues[i] / np.trace(cov.numpy()))
    torch.testing.assert_close(directions.T @ directions, torch.eye(3, dtype=torch.float64))
    assert torch.equal(tool.disentangle_superposition(cov, n_concepts=3), directions)


def test_pca_errors_name_the_fix(tool):
    with pytest.raises(ValueError, match="method='pca' takes a covariance matrix"):
        tool.disentangle_superposition(torch.randn(10, 4))
    with pytest.raises(ValueError, match="n_concepts=5 is out of range: it must be between 1 and"):
        tool.disentangle_superposition(torch.eye(4), n_concepts=5)
    with pytest.raises(ValueError, match="method must be 'pca' or 'ica'"):
        tool.disentangle_superposition(torch.eye(4), method="nmf")


def _mixture(n: int = 4000):
    """Three independent non-Gaussian sources (uniform, ±1, Laplace) mixed into 6 dimensions, plus an offset."""
    g = torch.Generator().manual_seed(0)
    s = torch.stack(
        [
            torch.rand(n, generator=g) * 2 - 1,
            torch.randint(0, 2, (n,), generator=g) * 2.0 - 1,
            -torch.log(torch.rand(n, generator=g)) * torch.sign(torch.randn(n, generator=g)),
        ],
        dim=1,
    ).double()
    s = (s - s.mean(0)) / s.std(0)
    mixing = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return s, mixing, s @ mixing.T + torch.arange(6.0, dtype=torch.float64)


def test_fast_ica_unmixes_independent_sources():
    sources, _, x = _mixture()
    res = fast_ica(x, 3)
    assert res.converged
    # each true source is one recovered source up to sign and order (scale is fixed by unit variance)
    corr = np.corrcoef(torch.cat([sources, res.sources], 1).T.numpy())[:3, 3:]
    match = np.abs(corr).argmax(1)
    assert sorted(match) == [0, 1, 2]
    assert np.abs(corr[[0, 1, 2], match]).min() > 0.995
    torch.testing.assert_close(res.mean + res.sources @ res.mixing.T, x)  # three sources explain x exactly
    torch.testing.assert_close(res.sources.std(0), torch.ones(3, dtype=torch.float64))
    contributed = res.mixing.pow(2).sum(0)
    assert torch.all(contributed[:-1] >= contributed[1:])  # ordered by variance contributed
    torch.testing.assert_close(res.explained_variance_ratio.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_ica_directions_are_the_mixing_directions_and_pca_ones_are_not(tool):
    _, mixing, x = _mixture()
    true = mixing / mixing.norm(dim=0)
    ica = tool.disentangle_superposition(x, n_concepts=3, method="ica")
    cos = (true.T @ ica).abs()
    assert cos.max(1).values.min() > 0.999  # every true direction found, up to sign and order
    pca = tool.disentangle_superposition(_by_hand_cov(x), n_concepts=3)
    assert (true.T @ pca).abs().max(1).values.min() < 0.99  # mixing directions are not orthogonal
    with pytest.warns(UserWarning, match="looks like a covariance matrix"):
        tool.disentangle_superposition(_by_hand_cov(x), n_concepts=2, method="ica")


def test_project_reconstruct_interpolate(tool):
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(5, 2, generator=g))[0]  # orthonormal concepts
    acts = torch.randn(3, 4, 5, generator=g)
    proj = tool.project_activations(acts, q)
    torch.testing.assert_close(proj, acts @ q)
    torch.testing.assert_close(tool.reconstruct_activations(proj, q), acts @ q @ q.T)
    skew = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # not orthogonal
    inside = torch.tensor([[2.0, -1.0, 0.0, 0.0, 0.0]])  # = 3 * skew[:, 0] - 1 * skew[:, 1]
    torch.testing.assert_close(tool.project_activations(inside, skew), torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(tool.reconstruct_activations(torch.tensor([[3.0, -1.0]]), skew), inside)
    c1, c2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(tool.interpolate_concepts(c1, c2, 0.25), torch.tensor([0.75, 0.5]))
    path = tool.interpolate_concepts(c1, c2, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(path, torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="concepts must be \\[d, n_concepts\\]"):
        tool.project_activations(acts, q.T)


def test_bad_hook_points_name_the_fix(tool):
    with pytest.raises(KeyError, match=r"Closest valid names: blocks\.0\.hook_resid_post"):
        tool.compute_activation_covariance([torch.arange(5)], "blocks.0.hook_resid_pots")
    with pytest.raises(ValueError, match=r"layer 7 is out of range; .* valid layers are 0\.\.1"):
        tool.compute_activation_covariance([torch.arange(5)], "blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"not a per-token activation .* pick a per-token activation"):
        tool.compute_activation_covariance([torch.arange(5)], "blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match="at least two tokens"):
        tool.compute_activation_covariance([torch.arange(1)], "blocks.0.hook_resid_post")
