"""The sparse loops of a TopK training step (``mechscope.sae.loops`` on CPU, torch's CSR kernels elsewhere) against
plain dense references: top-k sets, the column order of an index array, and the two sparse products."""

from __future__ import annotations

import pytest
import torch

from mechscope.sae import kernels, loops


def _sets(indices: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in indices]


@pytest.mark.parametrize(("m", "k"), [(50, 1), (50, 7), (50, 50), (4608, 32), (4608, 288)])
def test_top_indices_are_the_topk_sets_in_ascending_order(m: int, k: int) -> None:
    scores = torch.randn(37, m, generator=torch.Generator().manual_seed(m + k))
    got = loops.top_indices(scores, k)
    assert got.shape == (37, k)
    assert torch.equal(got, got.sort(dim=-1).values)
    assert _sets(got) == _sets(scores.topk(k, dim=-1).indices)


def test_top_indices_among_columns_and_ties_go_to_the_lower_column() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (64, 30), generator=g).float()  # many ties at every cut
    columns = torch.tensor([0, 2, 3, 5, 8, 9, 11, 17, 20, 21, 29])
    got = loops.top_indices(scores, 5, columns)
    for row, chosen in zip(scores, got, strict=True):
        # the plain reference: the allowed columns by value descending, then by column ascending
        ranked = sorted(columns.tolist(), key=lambda j: (-row[j].item(), j))
        assert chosen.tolist() == sorted(ranked[:5])
    among = torch.zeros(30, dtype=torch.bool)
    among[columns] = True
    assert _sets(kernels.top_indices(scores, 5, among)) == _sets(got)


def test_top_indices_refuse_nan_and_too_few_columns() -> None:
    scores = torch.randn(4, 10)
    scores[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged"):
        loops.top_indices(scores, 10)
    with pytest.raises(ValueError, match="cannot choose 4 of 3"):
        loops.top_indices(torch.randn(4, 10), 4, torch.tensor([1, 2, 3]))


def test_column_order_is_the_stable_sort_by_column() -> None:
    indices = torch.randint(0, 40, (300, 6), generator=torch.Generator().manual_seed(2))
    crow, order = loops.column_order(indices, 45)
    _, expected = indices.flatten().sort(stable=True)
    assert torch.equal(order, expected)
    assert torch.equal(crow[1:], torch.bincount(indices.flatten(), minlength=45).cumsum(0))
    assert crow[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scatter", [kernels.scatter_outer, kernels._scatter_outer_csr])
def test_scatter_outer_is_the_dense_transposed_product(dtype: torch.dtype, scatter) -> None:
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 23, (70, 5), generator=g)  # repeats within rows add up
    weights = torch.randn(70, 5, generator=g, dtype=dtype)
    rows = torch.randn(70, 9, generator=g, dtype=dtype)
    dense = torch.zeros(70, 25, dtype=dtype).scatter_add(-1, indices, weights)
    got = scatter(indices, weights, rows, 25)
    assert got.dtype == dtype
    torch.testing.assert_close(got, dense.T @ rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dot", [kernels.gathered_dot, kernels._gathered_dot_csr])
def test_gathered_dot_is_the_dense_product_at_the_indices(dtype: torch.dtype, dot) -> None:
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(70, 9, generator=g, dtype=dtype)
    table = torch.randn(25, 9, generator=g, dtype=dtype)
    indices = torch.randint(0, 25, (70, 5), generator=g)
    got = dot(rows, table, indices)
    assert got.dtype == dtype
    torch.testing.assert_close(got, (rows @ table.T).gather(-1, indices))


def test_top_indices_add_the_bias_before_choosing() -> None:
    g = torch.Generator().manual_seed(5)
    products, bias = torch.randn(40, 60, generator=g), 3 * torch.randn(60, generator=g)
    among = torch.rand(60, generator=g) < 0.5
    expected = (products + bias).masked_fill(~among, float("-inf")).topk(6, dim=-1).indices
    assert _sets(kernels.top_indices(products, 6, among=among, bias=bias)) == _sets(expected)
    assert _sets(kernels.top_indices(products, 6, bias=bias)) == _sets((products + bias).topk(6, dim=-1).indices)
