"""Co-occurrence counting against a dense ``B.T @ B`` reference, Jaccard against its formula, and the npz files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mechscope.cooccurrence import (
    count_cooccurrences,
    file_name,
    jaccard,
    load_counts,
    load_jaccard,
    load_matrix,
    matrix_path,
    save_counts,
    save_matrix,
)
from mechscope.cooccurrence.counting import CooccurrenceCounter, CountSum, sum_counts
from mechscope.cooccurrence.layout import KINDS
from mechscope.sae import SAE, SAEConfig
from mechscope.sae.latents import as_sparse

D_SAE = 40
THRESHOLDS = [0.0, 0.5, 1.25]


def dense_reference(batches: list[torch.Tensor], t: float, sae_threshold: torch.Tensor | None = None) -> np.ndarray:
    """C = sum over batches of B.T @ B, with B = (acts > t + sae_threshold) as int64: the obvious computation."""
    total = torch.zeros(D_SAE, D_SAE, dtype=torch.int64)
    for acts in batches:
        limit = t + (sae_threshold if sae_threshold is not None else torch.zeros(D_SAE))
        b = (acts.reshape(-1, D_SAE) > limit).to(torch.int64)
        total += b.T @ b
    return total.numpy()


def random_batches(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(2, 25, D_SAE, generator=g) * 1.5 - 0.8) for _ in range(n)]


def test_dense_batches_match_reference_for_every_threshold():
    batches = random_batches()
    sae_threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(1)) * 0.5
    for thr in (None, sae_threshold):
        counts = count_cooccurrences(batches, THRESHOLDS, sae_threshold=thr)
        assert list(counts) == THRESHOLDS
        for t in THRESHOLDS:
            expected = dense_reference(batches, t, thr)
            assert counts[t].counts.dtype == np.int64
            np.testing.assert_array_equal(counts[t].counts.toarray(), expected)
            np.testing.assert_array_equal(counts[t].activations, np.diag(expected))
            assert counts[t].n_tokens == 150
        assert counts[1.25].counts.sum() < counts[0.0].counts.sum()  # the thresholds did something


def test_sparse_pairs_match_dense_reference():
    batches = random_batches(seed=2)
    sparse = []
    for acts in batches:  # the 12 largest per token; rows with fewer non-zeros are padded with zero values
        values, indices = acts.topk(12, dim=-1)
        sparse.append((indices, values))
    assert min(float(v.min()) for _, v in sparse) == 0.0  # padding is present and must not count
    dense = [torch.zeros_like(a).scatter(-1, i, v) for a, (i, v) in zip(batches, sparse, strict=True)]
    counts = count_cooccurrences(sparse, THRESHOLDS, d_sae=D_SAE)
    for t in THRESHOLDS:
        np.testing.assert_array_equal(counts[t].counts.toarray(), dense_reference(dense, t))


def test_sae_encode_sparse_and_encode_give_the_same_counts():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=D_SAE, architecture="topk", k=6))
    xs = [torch.randn(3, 10, 16) for _ in range(2)]
    with torch.no_grad():
        dense = [sae.encode(x) for x in xs]
        sparse = [tuple(sae.encode_sparse(x)) for x in xs]
    from_sparse = count_cooccurrences(sparse, [0.0, 0.1], d_sae=D_SAE)
    from_dense = count_cooccurrences(dense, [0.0, 0.1])
    for t in (0.0, 0.1):
        expected = dense_reference(dense, t)
        assert expected.trace() > 0
        np.testing.assert_array_equal(from_sparse[t].counts.toarray(), expected)
        np.testing.assert_array_equal(from_dense[t].counts.toarray(), expected)


def test_dense_latents_become_sparse_latents_of_their_nonzero_entries():
    acts = random_batches(seed=6, n=1)[0]
    acts[0, 3] = 0  # a token with no active latent
    acts[1, 4, :5] = -0.5  # negative entries are listed too, and never count at a threshold >= 0
    sparse = as_sparse(acts)
    assert sparse.k == int((acts != 0).sum(dim=-1).max())
    assert torch.equal(sparse.to_dense(D_SAE), acts)
    assert sparse.indices.dtype == torch.int64 and sparse.values.shape == (*acts.shape[:-1], sparse.k)
    for t in THRESHOLDS:
        np.testing.assert_array_equal(
            count_cooccurrences([sparse], [t], d_sae=D_SAE)[t].counts.toarray(), dense_reference([acts], t)
        )
    assert as_sparse(torch.zeros(0, D_SAE)).k == 1


def test_exclude_drops_tokens():
    batches = random_batches(seed=3, n=2)
    masks = [torch.zeros(2, 25, dtype=torch.bool) for _ in batches]
    masks[0][:, 0] = True  # e.g. BOS
    masks[1][1, 3:7] = True
    counts = count_cooccurrences(batches, [0.0], exclude=masks)
    kept = [a[~m] for a, m in zip(batches, masks, strict=True)]
    np.testing.assert_array_equal(counts[0.0].counts.toarray(), dense_reference(kept, 0.0))
    assert counts[0.0].n_tokens == 100 - 2 - 4


def test_duplicate_sparse_indices_count_once():
    indices = torch.tensor([[3, 3, 5], [1, 2, 2]])
    values = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    c = count_cooccurrences([(indices, values)], [0.0], d_sae=6)[0.0].counts.toarray()
    expected = np.zeros((6, 6), dtype=np.int64)
    for active in ([3, 5], [1, 2]):
        for a in active:
            for b in active:
                expected[a, b] += 1
    np.testing.assert_array_equal(c, expected)


def test_no_batches_give_zero_counts():
    counts = count_cooccurrences([], [0.0], d_sae=3)[0.0]
    assert counts.n_tokens == 0 and counts.counts.shape == (3, 3) and counts.counts.nnz == 0
    with pytest.raises(ValueError, match="no batches"):
        count_cooccurrences([], [0.0])


def test_sparse_batches_refuse_negative_thresholds():
    with pytest.raises(ValueError, match="thresholds >= 0"):
        count_cooccurrences([(torch.tensor([[0]]), torch.tensor([[1.0]]))], [-0.5], d_sae=2)


def _unsorted_with_repeats(seed: int, n: int, entries: int, index_dtype: type) -> sp.csr_array:
    """A ``[n, n]`` int64 CSR matrix whose rows list their columns in random order, some twice, with explicit zeros."""
    g = np.random.default_rng(seed)
    rows, cols = np.sort(g.integers(0, n, entries)), g.integers(0, n, entries)
    data = g.integers(0, 5, entries)  # some 0: explicit zeros
    indptr = np.searchsorted(rows, np.arange(n + 1)).astype(index_dtype)
    return sp.csr_array((data.astype(np.int64), cols.astype(index_dtype), indptr), shape=(n, n))


def test_sum_counts_adds_any_matrices_as_dense_arrays_add():
    matrices = [_unsorted_with_repeats(seed, D_SAE, 300, dtype) for seed, dtype in enumerate([np.int32, np.int64] * 2)]
    matrices.insert(2, sp.csr_array((D_SAE, D_SAE), dtype=np.int64))  # a rank that counted nothing
    assert not matrices[0].has_canonical_format  # unsorted columns and repeats, as the counting kernel leaves them
    total = sum_counts(matrices)
    assert total.dtype == np.int64 and total.indices.dtype == np.int32
    np.testing.assert_array_equal(total.toarray(), sum(m.toarray() for m in matrices))
    columns = [total.indices[a:b] for a, b in zip(total.indptr[:-1], total.indptr[1:], strict=True)]
    assert all(len(set(c.tolist())) == len(c) for c in columns)  # each column once per row
    np.testing.assert_array_equal(sum_counts(matrices[:1]).toarray(), matrices[0].toarray())
    with pytest.raises(ValueError, match="square and of one shape"):
        sum_counts([matrices[0], sp.csr_array((D_SAE, D_SAE + 1), dtype=np.int64)])


def test_a_count_sum_of_many_batches_is_their_dense_sum_and_waits_on_a_stack_halving_in_size():
    start = _unsorted_with_repeats(99, D_SAE, 200, np.int64)
    batches = [_unsorted_with_repeats(seed, D_SAE, 400 - 12 * seed, np.int64) for seed in range(23)]  # shrinking
    running = CountSum(start)
    for n, batch in enumerate(batches, 1):
        running.add(batch)
        sizes = [m.nnz for m in running._stack]
        assert all(2 * b < a for a, b in itertools.pairwise(sizes)), sizes  # each under half the one below it
        assert sum(sizes[1:]) < sizes[0] or len(sizes) == 1
        if n in (1, 7, 23):
            expected = start.toarray() + sum(b.toarray() for b in batches[:n])
            np.testing.assert_array_equal(running.value().toarray(), expected)
            assert len(running._stack) == 1
    empty = CountSum()
    with pytest.raises(ValueError, match="empty sum"):
        empty.value()
    empty.add(batches[0])
    np.testing.assert_array_equal(empty.value().toarray(), batches[0].toarray())


@pytest.mark.parametrize("budget", [1, 3000, 10**9])  # a pass a batch, a pass every few batches, one at the end
def test_a_counter_fed_batch_by_batch_counts_what_the_dense_reference_counts_and_continues_from_a_start(budget):
    batches = random_batches(seed=11, n=7)
    sae_threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) * 0.5
    masks = [torch.rand(2, 25, generator=torch.Generator().manual_seed(i)) < 0.2 for i in range(7)]
    counter = CooccurrenceCounter(THRESHOLDS, sae_threshold=sae_threshold, pair_budget=budget)
    for batch, mask in zip(batches[:4], masks[:4], strict=True):
        counter.add(batch, mask)
    halfway = counter.counts()  # reading does not end the count
    later = CooccurrenceCounter(THRESHOLDS, sae_threshold=sae_threshold, start=halfway, pair_budget=budget)
    for batch, mask in zip(batches[4:], masks[4:], strict=True):
        counter.add(batch, mask)
        later.add(batch, mask)
    kept = sum(int((~m).sum()) for m in masks)
    for result in (counter.counts(), later.counts()):
        for t in THRESHOLDS:
            expected = dense_reference([b[~m] for b, m in zip(batches, masks, strict=True)], t, sae_threshold)
            np.testing.assert_array_equal(result[t].counts.toarray(), expected)
            assert result[t].n_tokens == kept
    assert halfway[THRESHOLDS[0]].n_tokens == sum(int((~m).sum()) for m in masks[:4])


def test_jaccard_matches_formula():
    counts = count_cooccurrences(random_batches(seed=4), [0.5])[0.5]
    c = counts.counts.toarray().astype(float)
    expected = np.zeros_like(c)
    for i in range(D_SAE):
        for j in range(D_SAE):
            union = c[i, i] + c[j, j] - c[i, j]
            expected[i, j] = c[i, j] / union if union > 0 else 0.0
    j = jaccard(counts)
    assert j.dtype == np.float32
    np.testing.assert_allclose(j.toarray(), expected, rtol=1e-6)
    # a never-active latent has 0 / 0 on the diagonal, which the reference turns into 0 (nan_to_num)
    never = sp.csr_array(np.diag([0, 3, 0]).astype(np.int64))
    np.testing.assert_array_equal(jaccard(never).toarray(), np.diag([0.0, 1.0, 0.0]))
    assert jaccard(never).nnz == 1


def test_save_and_load_counts_in_both_formats(tmp_path):
    counts = count_cooccurrences(random_batches(seed=5), [0.0, 1.5])
    for fmt, prefix in (("mechscope", "mechscope_cooc"), ("sae_cooccurrence", "feature_acts_cooc")):
        written = save_counts(tmp_path, counts, fmt)
        names = {p.name for p in written}
        expected_names = {f"{prefix}_{kind}_threshold_{t}.npz" for kind in KINDS for t in ("0_0", "1_5")}
        assert names == expected_names | {"feature_acts_cooc_n_tokens.json"}
        assert {p.name for p in tmp_path.iterdir()} == names  # the other format's files are gone
        for t in (0.0, 1.5):
            back = load_counts(tmp_path, t)
            assert back.n_tokens == 150
            np.testing.assert_array_equal(back.counts.toarray(), counts[t].counts.toarray())
            activations = load_matrix(tmp_path / file_name("activations", t, fmt))
            np.testing.assert_array_equal(activations, counts[t].activations)
            j = load_jaccard(tmp_path, t)
            np.testing.assert_array_equal(sp.csr_array(j).toarray(), jaccard(counts[t]).toarray())
            with np.load(tmp_path / file_name("total", t, fmt), allow_pickle=False) as f:
                if fmt == "mechscope":  # exact: int64 CSR
                    assert f["format"].item() == b"csr" and f["data"].dtype == np.int64
                else:  # the reference's: one dense float32 array
                    assert f.files == ["arr_0"] and f["arr_0"].dtype == np.float32 and f["arr_0"].shape == (40, 40)
            assert matrix_path(tmp_path, "total", t).name == file_name("total", t, fmt)


def test_counts_written_by_mechscope_before_the_format_names_are_read(tmp_path):
    """Files of earlier versions: the reference's names, each dense or scipy-sparse, whichever was smaller."""
    counts = count_cooccurrences(random_batches(seed=5), [0.5])[0.5]
    np.savez_compressed(tmp_path / "feature_acts_cooc_activations_threshold_0_5.npz", counts.activations)
    sp.save_npz(tmp_path / "feature_acts_cooc_total_threshold_0_5.npz", counts.counts)
    (tmp_path / "feature_acts_cooc_n_tokens.json").write_text('{"0.5": 150}')
    back = load_counts(tmp_path, 0.5)
    np.testing.assert_array_equal(back.counts.toarray(), counts.counts.toarray())
    with pytest.raises(FileNotFoundError, match=r"mechscope_cooc_jaccard_threshold_0_5\.npz nor feature_acts_cooc_"):
        load_jaccard(tmp_path, 0.5)
    with pytest.raises(ValueError, match="output_format"):
        file_name("total", 0.5, "dense")


def test_save_matrix_writes_sparse_or_the_references_dense_array(tmp_path):
    dense = np.arange(16, dtype=np.int64).reshape(4, 4)
    assert save_matrix(tmp_path / "d.npz", dense, dense=True) == "dense"
    with np.load(tmp_path / "d.npz", allow_pickle=False) as f:
        assert f.files == ["arr_0"]  # the reference reads the first array of the file
    np.testing.assert_array_equal(load_matrix(tmp_path / "d.npz"), dense)
    assert save_matrix(tmp_path / "v.npz", dense[0]) == "dense"  # 1-d: always an array
    np.testing.assert_array_equal(load_matrix(tmp_path / "v.npz"), dense[0])
    for name, matrix in (("s.npz", dense), ("b.npz", sp.csr_array(([7, 9], ([1, 500], [2, 3])), shape=(1000, 1000)))):
        assert save_matrix(tmp_path / name, matrix) == "sparse"
        back = load_matrix(tmp_path / name)
        assert isinstance(back, sp.csr_array)
        np.testing.assert_array_equal(back.toarray(), sp.csr_array(matrix).toarray())


def brute_force_counts(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> np.ndarray:
    """Loop over tokens and over every pair of their distinct active latents: the plainest count there is."""
    expected = np.zeros((d_sae, d_sae), dtype=np.int64)
    for token_indices, token_values in zip(indices.tolist(), values.tolist(), strict=True):
        active = sorted({i for i, v in zip(token_indices, token_values, strict=True) if v > 0})
        for a in active:
            for b in active:
                expected[a, b] += 1
    return expected


@pytest.mark.parametrize("seed", range(6))
def test_kernel_matches_brute_force_at_odd_shapes(seed):
    """Random sparse batches with repeated latents in a token, empty tokens (all values 0), a latent shared by every
    token and one batch where all tokens list the same latents, at shapes that are not powers of two."""
    g = torch.Generator().manual_seed(seed)
    tokens, k, d_sae = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g)), 37
    indices = torch.randint(0, d_sae, (tokens, k), generator=g)
    indices[:, 0] = 7  # every token shares latent 7 ...
    values = torch.rand(tokens, k, generator=g) * (torch.rand(tokens, k, generator=g) > 0.3)
    values[: tokens // 5] = 0.0  # ... except the empty ones
    if seed % 3 == 0:
        indices[:] = indices[0]  # all tokens list the same latents
    expected = brute_force_counts(indices, values, d_sae)
    for n_batches in (1, 2):
        counts = count_cooccurrences([(indices, values)] * n_batches, [0.0], d_sae=d_sae)[0.0].counts
        assert counts.dtype == np.int64 and counts.shape == (d_sae, d_sae)
        np.testing.assert_array_equal(counts.toarray(), n_batches * expected)
        assert counts.nnz == np.count_nonzero(expected)  # no explicit zeros, no duplicate entries


def test_a_large_batch_matches_dense_reference():
    """A batch of over a million pair increments (long rows, many repeated pairs), with repeated latents in a token
    and empty tokens, against the dense product."""
    g = torch.Generator().manual_seed(11)
    tokens, k, d_sae = 1100, 40, 301
    indices = torch.randint(0, d_sae, (tokens, k), generator=g)
    indices[:, :3] = torch.tensor([5, 5, 299])  # a repeat in every token, and a latent every token shares
    values = torch.rand(tokens, k, generator=g) + 0.01
    values[::7] = 0.0  # empty tokens
    dense = torch.zeros(tokens, d_sae).scatter(-1, indices, values)
    b = (dense > 0).to(torch.int64)
    expected = (b.T @ b).numpy()
    assert int((values > 0).sum(dim=-1).pow(2).sum()) > 2**20
    counts = count_cooccurrences([(indices, values)], [0.0], d_sae=d_sae)[0.0].counts
    assert counts.dtype == np.int64 and counts.nnz == np.count_nonzero(expected)
    np.testing.assert_array_equal(counts.toarray(), expected)
    assert expected[299, 299] == expected[5, 299] == tokens - len(range(0, tokens, 7))


@pytest.mark.parametrize("tokens", [4096, 70_000])
def test_a_pair_active_on_every_token_counts_every_token(tokens):
    """The largest count a batch can hold (every token), also past what 16 bits can hold."""
    g = torch.Generator().manual_seed(tokens)
    indices = torch.cat([torch.tensor([[3, 9]]).expand(tokens, 2), torch.randint(10, 50, (tokens, 1), generator=g)], 1)
    values = torch.ones(tokens, 3)
    counts = count_cooccurrences([(indices, values)] * 2, [0.0], d_sae=50)[0.0]
    c = counts.counts
    assert c.dtype == np.int64 and counts.n_tokens == 2 * tokens
    assert c[3, 9] == c[9, 3] == c[3, 3] == c[9, 9] == 2 * tokens
    np.testing.assert_array_equal(c.toarray()[10:, 3], 2 * np.bincount(indices[:, 2].numpy(), minlength=50)[10:])


def test_empty_batches_count_their_tokens_and_no_pairs():
    """A batch of no tokens and a batch whose tokens have no active latent, between ordinary batches."""
    g = torch.Generator().manual_seed(12)
    indices = torch.randint(0, D_SAE, (30, 5), generator=g)
    values = torch.rand(30, 5, generator=g)
    batches = [
        (indices, values),
        (torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, 5)),
        (indices, torch.zeros(30, 5)),
        (indices, values),
    ]
    counts = count_cooccurrences(batches, [0.0], d_sae=D_SAE)[0.0]
    assert counts.n_tokens == 90
    np.testing.assert_array_equal(counts.counts.toarray(), 2 * brute_force_counts(indices, values, D_SAE))
    alone = count_cooccurrences(batches[1:3], [0.0], d_sae=D_SAE)[0.0]
    assert alone.n_tokens == 30 and alone.counts.nnz == 0 and alone.counts.dtype == np.int64


def test_many_batches_fold_into_int64_totals():
    """Forty different batches summed batch by batch equal the sum of their brute-force counts."""
    g = torch.Generator().manual_seed(13)
    batches = []
    for _ in range(40):
        indices = torch.randint(0, 23, (int(torch.randint(1, 40, (1,), generator=g)), 6), generator=g)
        batches.append(
            (indices, torch.rand(indices.shape, generator=g) * (torch.rand(indices.shape, generator=g) > 0.2))
        )
    counts = count_cooccurrences(batches, [0.0], d_sae=23)[0.0].counts
    expected = sum(brute_force_counts(i, v, 23) for i, v in batches)
    assert counts.dtype == np.int64 and counts.nnz == np.count_nonzero(expected)
    np.testing.assert_array_equal(counts.toarray(), expected)
