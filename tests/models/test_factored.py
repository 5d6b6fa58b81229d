"""FactoredMatrix against the dense product: SVD, norm, eigenvalues, products, indexing, batches."""

from __future__ import annotations

import pytest
import torch

from mechscope.models.factored import FactoredMatrix


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-9) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-7 if a.dtype == torch.float64 else 1e-4)


def same_multiset(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-8) -> None:
    """Each value of ``got`` pairs with a distinct value of ``expected`` within ``atol`` (order-free)."""
    assert got.shape == expected.shape
    left = list(expected.tolist())
    for value in got.tolist():
        nearest = min(range(len(left)), key=lambda i: abs(left[i] - value))
        assert abs(left[nearest] - value) < atol, (value, left[nearest])
        left.pop(nearest)


# (A shape, B shape): thin inner size, inner size larger than one side, broadcast batch dimensions
SHAPES = [
    ((7, 3), (3, 5)),
    ((4, 6), (6, 9)),
    ((6, 6), (6, 6)),
    ((4, 6), (6, 4)),
    ((2, 3, 8, 4), (3, 4, 8)),
    ((3, 1, 5, 2), (1, 4, 2, 5)),
]


@pytest.mark.parametrize(("a_shape", "b_shape"), SHAPES)
def test_svd_and_norm_match_the_dense_product(a_shape, b_shape):
    A, B = rand(*a_shape), rand(*b_shape, seed=1)  # noqa: N806
    fm, dense = FactoredMatrix(A, B), A @ B
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    r = min(m, k, n)
    assert fm.shape == dense.shape and fm.ndim == dense.ndim and fm.mdim == k
    close(fm.AB, dense)
    U, S, Vh = fm.svd()  # noqa: N806
    assert U.shape == (*dense.shape[:-1], r) and S.shape == (*dense.shape[:-2], r)
    assert Vh.shape == (*dense.shape[:-2], r, n)
    close(S, torch.linalg.svdvals(dense)[..., :r])
    close(U @ torch.diag_embed(S) @ Vh, dense)
    eye = torch.eye(r, dtype=A.dtype).expand(*dense.shape[:-2], r, r)
    close(U.mT @ U, eye)
    close(Vh @ Vh.mT, eye)
    assert fm.U is U and fm.S is S and fm.Vh is Vh  # computed once
    close(fm.norm(), torch.linalg.matrix_norm(dense))
    close(fm.T.AB, dense.mT)
    close(fm.T.S, S)


@pytest.mark.parametrize(("a_shape", "b_shape"), [s for s in SHAPES if s[0][-2] == s[1][-1]])
def test_eigenvalues_match_the_dense_product(a_shape, b_shape):
    A, B = rand(*a_shape), rand(*b_shape, seed=1)  # noqa: N806
    fm, dense = FactoredMatrix(A, B), A @ B
    m, k = a_shape[-2], a_shape[-1]
    close(fm.BA, B @ A)
    got = fm.eigenvalues.reshape(-1, min(m, k))
    for g, d in zip(got, torch.linalg.eigvals(dense).reshape(-1, m), strict=True):
        # A @ B has the nonzero eigenvalues of B @ A and m - k zeros besides
        same_multiset(g, d[d.abs().argsort(descending=True)][: min(m, k)])
        assert (d.abs() < 1e-8).sum() == m - min(m, k)


def test_products_with_tensors_and_factored_matrices_on_both_sides():
    A, B = rand(2, 6, 3), rand(3, 7, seed=1)  # noqa: N806
    fm, dense = FactoredMatrix(A, B), A @ B
    wide = FactoredMatrix(rand(5, 8, seed=2), rand(8, 6, seed=3))  # inner size larger than both sides
    C, D, E = rand(7, 5, seed=4), rand(4, 6, seed=5), rand(7, 2, seed=6)  # noqa: N806
    for product, expected, inner in [
        (fm @ C, dense @ C, 3),
        (D @ fm, D @ dense, 3),
        (wide @ rand(6, 9, seed=7), wide.AB @ rand(6, 9, seed=7), 6),
        (rand(9, 5, seed=7) @ wide, rand(9, 5, seed=7) @ wide.AB, 5),
        (fm @ FactoredMatrix(E, E.T), dense @ E @ E.T, 2),
        (wide @ fm, wide.AB @ dense, 3),
    ]:
        assert isinstance(product, FactoredMatrix)
        assert product.mdim == inner  # the smaller of the two possible inner sizes
        close(product.AB, expected)
    vec_r, vec_l = rand(7, seed=8), rand(6, seed=9)
    close(fm @ vec_r, dense @ vec_r)  # [2, 6]
    close(vec_l @ fm, vec_l @ dense)  # [2, 7]
    with pytest.raises(ValueError, match="cannot multiply"):
        fm @ rand(6, 2)


def test_indexing_selects_batch_dimensions():
    A, B = rand(3, 4, 5, 2), rand(4, 2, 5, seed=1)  # noqa: N806
    fm, dense = FactoredMatrix(A, B), A @ B
    close(fm[1].AB, dense[1])
    close(fm[1, 2].AB, dense[1, 2])
    close(fm[:, 0].AB, dense[:, 0])
    close(fm[..., 3].AB, dense[..., 3, :, :])
    close(fm[0, 1:3].S, torch.linalg.svdvals(dense[0, 1:3])[..., :2])
    with pytest.raises(IndexError, match="batch dimensions"):
        fm[0, 0, 0]


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="inner dimensions differ"):
        FactoredMatrix(rand(3, 4), rand(5, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        FactoredMatrix(rand(2, 3, 4), rand(3, 4, 3))
    with pytest.raises(ValueError, match="square"):
        _ = FactoredMatrix(rand(3, 2), rand(2, 4)).eigenvalues


def test_decompositions_never_form_the_product():
    """A 200000 x 200000 matrix of rank 4 (160 GB if formed): SVD, norm and eigenvalues from the factors."""
    n, k = 200_000, 4
    A, B = rand(n, k, dtype=torch.float32), rand(k, n, seed=1, dtype=torch.float32)  # noqa: N806
    fm = FactoredMatrix(A, B)
    U, S, Vh = fm.svd()  # noqa: N806
    rows, cols = torch.tensor([0, 17, 199_999]), torch.tensor([5, 123_456, 42])
    close((U[rows] * S) @ Vh[:, cols], A[rows] @ B[:, cols], atol=1e-2)
    gram = (A.double().T @ A.double()) @ (B.double() @ B.double().T)  # its eigenvalues: the squared singular values
    squared = torch.linalg.eigvals(gram).real.sort(descending=True).values
    torch.testing.assert_close(S.double(), squared.sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(fm.norm().double(), gram.trace().sqrt(), rtol=1e-4, atol=0)  # ||AB||^2 = tr(gram)
    expected = torch.linalg.eigvals(B.double() @ A.double())
    same_multiset(fm.eigenvalues.to(torch.complex128), expected, atol=1e-4 * float(expected.abs().max()))


def test_half_precision_factors_are_decomposed_in_float32():
    A, B = rand(6, 3, dtype=torch.bfloat16), rand(3, 6, seed=1, dtype=torch.bfloat16)  # noqa: N806
    fm = FactoredMatrix(A, B)
    dense = A.float() @ B.float()
    assert fm.S.dtype == torch.float32
    close(fm.S, torch.linalg.svdvals(dense)[:3], atol=1e-4)
    same_multiset(fm.eigenvalues, torch.linalg.eigvals(B.float() @ A.float()), atol=1e-2)
