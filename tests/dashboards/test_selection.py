"""Streaming selections against brute force over the dense latents."""

from __future__ import annotations

import pytest
import torch

from mechscope.dashboards.density import ActivationHistograms, FiringCounts
from mechscope.dashboards.layout import NO_TOKEN
from mechscope.dashboards.logit_effects import logit_effects
from mechscope.dashboards.selection import EMPTY, BinSamples, TopExamples, priority
from mechscope.dashboards.windows import Windows
from mechscope.sae.latents import SparseLatents

D_SAE, N_CONTEXTS, CONTEXT_LENGTH = 12, 9, 14


def corpus(seed: int = 0, drop: float = 0.1):
    """Dense latents ``[n, D_SAE]`` (about a third active, some values tied), with context, position and token of
    each row; a few positions are left out, as a harvest leaves out special tokens."""
    g = torch.Generator().manual_seed(seed)
    context = torch.arange(N_CONTEXTS).repeat_interleave(CONTEXT_LENGTH)
    position = torch.arange(CONTEXT_LENGTH).repeat(N_CONTEXTS)
    kept = torch.rand(context.numel(), generator=g) > drop
    context, position = context[kept], position[kept]
    dense = (torch.randn(context.numel(), D_SAE, generator=g) - 0.4).relu()
    dense[::7, 3] = 1.5  # ties
    dense[:, 11] = 0  # a dead latent
    tokens = torch.randint(0, 1000, (context.numel(),), generator=g)
    return dense, context, position, tokens


def batches(n: int, sizes: list[int]):
    start = 0
    for size in sizes * (n // max(sum(sizes), 1) + 1):
        if start >= n:
            return
        yield slice(start, start + size)
        start += size


def test_top_examples_equal_brute_force_whatever_the_batching():
    dense, context, position, _ = corpus()
    k = 5
    results = []
    for sizes in ([len(dense)], [1, 3, 17], [40]):
        top = TopExamples(D_SAE, k)
        for s in batches(len(dense), sizes):
            top.update(SparseLatents.from_dense(dense[s]), context[s], position[s])
        results.append(top.selection)
    for latent in range(D_SAE):
        rows = [r for r in range(len(dense)) if dense[r, latent] > 0]
        rows.sort(key=lambda r: (-float(dense[r, latent]), int(context[r]), int(position[r])))
        want = rows[:k]
        for sel in results:
            got = [
                (int(c), int(p)) for c, p in zip(sel.context[latent], sel.position[latent], strict=True) if c != EMPTY
            ]
            assert got == [(int(context[r]), int(position[r])) for r in want]
            assert sel.values[latent, : len(want)].tolist() == [float(dense[r, latent]) for r in want]
    assert (results[0].context[11] == EMPTY).all()


def test_top_examples_merge_of_two_ranks_equals_one_pass():
    dense, context, position, _ = corpus(1)
    whole, a, b = TopExamples(D_SAE, 4), TopExamples(D_SAE, 4), TopExamples(D_SAE, 4)
    whole.update(SparseLatents.from_dense(dense), context, position)
    half = len(dense) // 2
    b.update(SparseLatents.from_dense(dense[half:]), context[half:], position[half:])
    a.update(SparseLatents.from_dense(dense[:half]), context[:half], position[:half])
    b.merge(a)
    assert torch.equal(b.selection.context, whole.selection.context)
    assert torch.equal(b.selection.position, whole.selection.position)
    assert torch.equal(whole.max_activation(), dense.max(dim=0).values)


def test_bin_samples_are_the_highest_priorities_in_each_bin_and_cover_their_bins():
    dense, context, position, _ = corpus(2)
    n_bins, per_bin = 4, 3
    maxes = dense.max(dim=0).values
    samples = BinSamples(maxes, n_bins, per_bin, seed=5)
    for s in batches(len(dense), [5, 11]):
        samples.update(SparseLatents.from_dense(dense[s]), context[s], position[s])
    edges = samples.bin_edges()
    for latent in range(D_SAE):
        for b in range(n_bins):
            lo, hi = float(edges[latent, b]), float(edges[latent, b + 1])
            members = [r for r in range(len(dense)) if lo < float(dense[r, latent]) <= hi and dense[r, latent] > 0]
            if b == 0:  # the first bin starts just above 0
                members = [r for r in range(len(dense)) if 0 < float(dense[r, latent]) <= hi]
            prio = {
                r: float(priority(context[r : r + 1], position[r : r + 1], torch.tensor([latent]), 5)) for r in members
            }
            want = sorted(members, key=lambda r: -prio[r])[:per_bin]
            group = latent * n_bins + b
            got = [
                (int(c), int(p))
                for c, p in zip(samples.selection.context[group], samples.selection.position[group], strict=True)
                if c != EMPTY
            ]
            assert sorted(got) == sorted((int(context[r]), int(position[r])) for r in want)
            assert int(samples.counts[group]) == len(members)
            values = samples.selection.values[group][samples.selection.filled()[group]]
            assert ((values > lo) | (b == 0)).all() and (values <= hi).all() and (values > 0).all()


def test_bin_samples_draw_uniformly():
    # 10 tokens in one bin, 2 drawn: over many seeds each token is drawn about 1/5 of the time
    values = torch.full((10, 1), 1.0)
    context, position = torch.zeros(10, dtype=torch.long), torch.arange(10)
    counts = torch.zeros(10)
    n = 3000
    for seed in range(n):
        s = BinSamples(torch.tensor([1.0]), n_bins=1, per_bin=2, seed=seed)
        s.update(SparseLatents.from_dense(values), context, position)
        counts[s.selection.position[0]] += 1
    freq = counts / n
    assert (freq - 0.2).abs().max() < 0.035  # binomial sd 0.0073: a 4.8-sigma band


def test_windows_equal_the_tokens_and_activations_around_each_example():
    dense, context, position, tokens = corpus(3)
    top = TopExamples(D_SAE, 3)
    top.update(SparseLatents.from_dense(dense), context, position)
    filled = top.selection.filled()
    latent = torch.arange(D_SAE)[:, None].expand_as(filled)[filled]
    w = 2
    windows = Windows(top.selection.context[filled], top.selection.position[filled], latent, window=w)
    for s in batches(len(dense), [7, 30]):
        windows.update(SparseLatents.from_dense(dense[s]), context[s], position[s], tokens[s])
    table = {(int(c), int(p)): r for r, (c, p) in enumerate(zip(context, position, strict=True))}
    for e in range(latent.numel()):
        c, p, lat = int(windows.context[e]), int(windows.position[e]), int(latent[e])
        for col, q in enumerate(range(p - w, p + w + 1)):
            r = table.get((c, q))
            assert int(windows.tokens[e, col]) == (NO_TOKEN if r is None else int(tokens[r]))
            assert float(windows.activations[e, col]) == (0.0 if r is None else float(dense[r, lat]))
        assert float(windows.activations[e, w]) == float(top.selection.values[filled][e])


@pytest.mark.parametrize("norm", [False, True])
def test_logit_effects_equal_the_dense_product(norm):
    g = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(37, 8, generator=g), torch.randn(8, 50, generator=g)  # noqa: N806
    weight = torch.rand(8, generator=g) + 0.5 if norm else None
    effects = logit_effects(W_dec, W_U, weight, n=4, chunk=10)
    full = (W_dec * (weight if norm else 1.0)) @ W_U
    assert torch.allclose(effects.top_values, full.topk(4, dim=1).values, atol=1e-5)
    assert torch.equal(effects.top_tokens, full.topk(4, dim=1).indices)
    assert torch.equal(effects.bottom_tokens, (-full).topk(4, dim=1).indices)


def test_firing_counts_and_histograms_equal_brute_force_and_merge():
    dense, _, _, _ = corpus(4)
    maxes = dense.max(dim=0).values
    n_bins = 6
    counts, hist = FiringCounts(D_SAE), ActivationHistograms(maxes, n_bins)
    other_counts, other_hist = FiringCounts(D_SAE), ActivationHistograms(maxes, n_bins)
    half = len(dense) // 2
    for s, (c, h) in ((slice(0, half), (counts, hist)), (slice(half, None), (other_counts, other_hist))):
        c.update(SparseLatents.from_dense(dense[s]))
        h.update(SparseLatents.from_dense(dense[s]))
    counts.merge(other_counts)
    hist.merge(other_hist)
    assert counts.n_tokens == len(dense)
    assert torch.equal(counts.density(), (dense > 0).double().mean(dim=0))
    edges = hist.edges()
    for latent in range(D_SAE):
        for b in range(n_bins):
            lo, hi = float(edges[latent, b]), float(edges[latent, b + 1])
            column = dense[:, latent]
            assert int(hist.counts[latent, b]) == int(((column > lo) & (column <= hi) & (column > 0)).sum())
    assert int(hist.counts.sum()) == int((dense > 0).sum())
