"""The CPU loops behind :mod:`mechscope.sae.kernels` (numba, compiled on first use and cached): a row-wise top-k
by selection rather than sorting, the column order of a sparse pattern by counting, and the two sparse products of
a TopK step's backward pass, each touching only the selected entries.

They run on numpy views of CPU tensors in one thread, like the co-occurrence counting kernel: more cores are used by
more ranks under torchrun (docs/distributed.md), and numba's OpenMP threads would busy-wait beside torch's.
``kernels.py`` calls them on CPU and torch's own kernels elsewhere.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

_SUMS = {"reassoc", "contract"}  # fastmath flags of the sums: in any order (vectorised), fused multiply-adds


def top_indices(scores: Tensor, k: int, columns: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``[n, k]`` int64: in each row of ``scores [n, m]`` (plus ``bias [m]`` when given), the columns of the ``k``
    largest values, ascending (the set ``scores.topk(k).indices`` holds, ties going to the lower column).
    ``columns``: the only columns to choose from (ascending, at least ``k``; default all). NaN scores raise: they
    mean the training has diverged."""
    m = scores.shape[1]
    allowed = np.arange(m, dtype=np.int64) if columns is None else columns.numpy()
    if not 0 < k <= len(allowed):
        raise ValueError(f"cannot choose {k} of {len(allowed)} columns")
    out = np.empty((len(scores), k), np.int64)
    scores = scores.detach().contiguous()
    shift = np.zeros(m, scores.numpy().dtype) if bias is None else bias.detach().to(scores.dtype).numpy()
    if _top_indices(scores.numpy(), shift, allowed, out):
        raise FloatingPointError("the scores hold NaN (the training has diverged): lower the learning rate")
    return torch.from_numpy(out)


@numba.njit(cache=True, nogil=True)
def _top_indices(scores: np.ndarray, bias: np.ndarray, columns: np.ndarray, out: np.ndarray) -> bool:
    """Fill ``out [n, k]`` with each row's top-``k`` of ``(scores + bias)[:, columns]`` (as columns of ``scores``);
    True when a row could not be filled (NaN).

    Per row: the smallest of the maxima of ``k`` disjoint blocks is a floor of the ``k``-th largest (``k`` values
    reach it), so only the values at or above it (a few times ``k``) go to the selection; the passes over the row
    are branch-free (a sorted-out value costs no mispredicted branch)."""
    n, k = out.shape
    c = len(columns)
    short = np.zeros(n, np.bool_)
    for t in range(n):
        row = np.empty(c, scores.dtype)
        for j in range(c):
            row[j] = scores[t, columns[j]] + bias[columns[j]]
        floor = np.inf
        for b in range(k):  # block b: [b * c // k, (b + 1) * c // k), none empty as k <= c
            top = -np.inf
            for j in range(b * c // k, (b + 1) * c // k):
                top = max(top, row[j])
            floor = min(floor, top)
        candidates = np.empty(c, scores.dtype)
        m = 0
        for j in range(c):
            candidates[m] = row[j]
            m += row[j] >= floor
        cut = _kth_largest(candidates[:m], k)
        taken = np.empty(c, np.int64)  # the positions at or above the cut, ascending
        m = 0
        for j in range(c):
            taken[m] = j
            m += row[j] >= cut
        if m > k:  # values equal to the cut beyond the k-th: keep the first ones
            ties = k - (m - _count_equal(row, taken[:m], cut))
            kept = 0
            for e in range(m):
                j = taken[e]
                if row[j] > cut or (row[j] == cut and ties > 0):
                    ties -= row[j] == cut
                    taken[kept] = j
                    kept += 1
            m = kept
        for e in range(min(m, k)):
            out[t, e] = columns[taken[e]]
        short[t] = m < k
    return bool(short.any())


@numba.njit(cache=True, nogil=True)
def _count_equal(row: np.ndarray, positions: np.ndarray, value: float) -> int:
    count = 0
    for j in positions:
        count += row[j] == value
    return count


@numba.njit(cache=True, nogil=True)
def _kth_largest(values: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``values`` (reordered in place): Hoare's selection, median-of-three pivots."""
    lo, hi, target = 0, len(values) - 1, k - 1
    while lo < hi:
        a, b, z = values[lo], values[(lo + hi) // 2], values[hi]
        pivot = max(min(a, b), min(max(a, b), z))
        i, j = lo, hi
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return values[target]


def column_order(indices: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The entries of ``indices [n, k]`` (columns in ``[0, m)``) grouped by column, by counting: ``(crow [m + 1],
    order [n * k])``, the flat positions of column ``j``'s entries being ``order[crow[j]:crow[j + 1]]``, ascending
    (what ``indices.flatten().sort(stable=True)`` gives, in linear time)."""
    crow = np.zeros(m + 1, np.int64)
    order = np.empty(indices.numel(), np.int64)
    _column_order(indices.reshape(-1).numpy(), crow, order)
    return torch.from_numpy(crow), torch.from_numpy(order)


@numba.njit(cache=True, nogil=True)
def _column_order(flat: np.ndarray, crow: np.ndarray, order: np.ndarray) -> None:
    for e in range(len(flat)):
        crow[flat[e] + 1] += 1
    for j in range(len(crow) - 1):
        crow[j + 1] += crow[j]
    fill = crow[:-1].copy()
    for e in range(len(flat)):
        j = flat[e]
        order[fill[j]] = e
        fill[j] += 1


def scatter_outer(crow: Tensor, order: Tensor, k: int, weights: Tensor, rows: Tensor) -> Tensor:
    """``out [m, d]``: ``out[j] = sum of weights[t, s] * rows[t]`` over the entries ``(t, s)`` of column ``j``
    (``column_order`` of an ``[n, k]`` index array), for ``weights [n, k]`` and ``rows [n, d]``."""
    out = np.zeros((len(crow) - 1, rows.shape[1]), rows.numpy().dtype)
    _scatter_outer(crow.numpy(), order.numpy(), k, weights.contiguous().numpy().reshape(-1), rows.contiguous().numpy(),
                   out)  # fmt: skip
    return torch.from_numpy(out)


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _scatter_outer(
    crow: np.ndarray, order: np.ndarray, k: int, weights: np.ndarray, rows: np.ndarray, out: np.ndarray
) -> None:
    for j in range(len(crow) - 1):
        acc = out[j]
        for e in range(crow[j], crow[j + 1]):
            flat = order[e]
            w = weights[flat]
            source = rows[flat // k]
            for c in range(len(acc)):
                acc[c] += w * source[c]


def gathered_dot(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """``out [n, k]``: ``out[t, s] = rows[t] · table[indices[t, s]]`` for ``rows [n, d]``, ``table [m, d]``."""
    out = np.zeros(tuple(indices.shape), rows.numpy().dtype)
    _gathered_dot(rows.contiguous().numpy(), table.contiguous().numpy(), indices.contiguous().numpy(), out)
    return torch.from_numpy(out)


@numba.njit(cache=True, nogil=True, fastmath=_SUMS)
def _gathered_dot(rows: np.ndarray, table: np.ndarray, indices: np.ndarray, out: np.ndarray) -> None:
    n, k = indices.shape
    for t in range(n):
        row = rows[t]
        for s in range(k):
            other = table[indices[t, s]]
            acc = out[t, s]  # 0, in the rows' dtype
            for c in range(len(row)):
                acc += row[c] * other[c]
            out[t, s] = acc
