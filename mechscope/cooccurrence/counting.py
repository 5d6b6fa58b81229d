"""Exact co-occurrence counts of SAE latents and their Jaccard normalisation (written by
:mod:`mechscope.cooccurrence.outputs`).

A latent is active on a token when its activation exceeds the activity threshold ``t`` (plus its own JumpReLU
threshold when the SAE has one). For each threshold, ``C[i, j]`` counts the tokens on which latents ``i`` and ``j``
are both active, so ``C[i, i]`` counts the tokens on which ``i`` is active. Each batch becomes a sparse boolean
matrix ``B [tokens, d_sae]`` and ``C += B.T @ B``, a sparse product computed by a numba kernel: the work per token
grows with the square of its number of active latents, never with ``d_sae ** 2``.

The reference (``sae_cooccurrence``) folds each SAE's decoder norms into its encoder before it thresholds
(SAELens's ``fold_W_dec_norm``): a latent's activation is then measured along its unit decoder direction.
:func:`fold_decoder_norms` does the same to encoded latents (and the pipeline to the JumpReLU threshold), so an SAE
whose decoder rows are not unit norm gives the reference's counts at every threshold above 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.sae.latents import LatentsLike, SparseLatents, as_sparse, dense_width


@dataclass
class CooccurrenceCounts:
    """Counts at one activity threshold.

    ``counts`` is a symmetric ``[d_sae, d_sae]`` int64 CSR matrix: ``counts[i, j]`` = tokens on which latents ``i``
    and ``j`` are both active, the diagonal = tokens on which ``i`` is active. ``n_tokens`` = tokens counted.
    """

    threshold: float
    counts: sp.csr_array
    n_tokens: int

    @property
    def activations(self) -> np.ndarray:
        """``[d_sae]`` int64: on how many tokens each latent is active (the diagonal of ``counts``)."""
        return self.counts.diagonal().astype(np.int64)


def decoder_norms(W_dec: Tensor) -> Tensor:  # noqa: N803 (the weight's usual name)
    """``[d_sae]`` float32: the norm of each decoder row of ``W_dec [d_sae, d_in]``, at least 1e-8 (as SAELens
    clamps it, so that dividing by it is safe)."""
    return W_dec.detach().float().norm(dim=-1).clamp_min(1e-8)


def fold_decoder_norms(latents: LatentsLike, norms: Tensor) -> SparseLatents:
    """``latents`` of an SAE as the same SAE gives them after its decoder norms ``norms [d_sae]`` are folded into its
    encoder (SAELens's ``fold_W_dec_norm``): each activation times its latent's decoder-row norm, the decoder rows
    (``W_dec / norms[:, None]``) then unit norm, so the reconstruction is unchanged.

    For a ReLU SAE this is exactly the folded SAE's output; for a JumpReLU SAE also fold its threshold
    (``threshold * norms``) to keep which latents pass; a TopK SAE keeps the latents it chose (the folded SAE's
    own top k could differ, which is why SAELens 6 refuses to fold one).
    """
    sparse = as_sparse(latents)
    scale = norms.to(sparse.values.device, sparse.values.dtype)
    return SparseLatents(sparse.indices, sparse.values * scale[sparse.indices])


def _active(latents: SparseLatents, threshold: Tensor, keep: Tensor | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(rows, cols, n_tokens)`` of the active entries of one batch, rows ascending.

    ``latents`` has ``[..., k]`` indices and values; ``threshold [d_sae]`` is the full per-latent threshold (>= 0,
    so the latents a token does not list, which are 0, are never active); ``keep [...]`` (bool) selects the tokens
    to count.
    """
    if (threshold < 0).any():
        raise ValueError(
            "counting needs thresholds >= 0 (activity threshold plus the SAE's own): the latents a token does not "
            "list are 0"
        )
    k = latents.k
    indices, values = latents.indices.reshape(-1, k), latents.values.reshape(-1, k)
    if keep is not None:
        indices, values = indices[keep.reshape(-1)], values[keep.reshape(-1)]
    rows, pos = (values > threshold[indices]).nonzero(as_tuple=True)
    return rows.numpy(), indices[rows, pos].numpy(), values.shape[0]


_ONE = np.uint64(1)


@numba.njit(cache=True, nogil=True)
def _token_lists(
    rows: np.ndarray, cols: np.ndarray, n_tokens: int, d_sae: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Both sides of the boolean ``B [n_tokens, d_sae]`` (1 at ``(rows, cols)``, rows ascending), a latent listed
    twice for one token kept once: ``(tok_ptr [n_tokens + 1] uint64, tok_cols [nnz] uint32)``, each token's latents;
    ``(lat_ptr [d_sae + 1] uint64, lat_tok [nnz] uint32)``, each latent's tokens, ascending; and ``sum_t |t|**2``,
    the number of pair increments of ``B.T @ B`` (an upper bound of its non-zeros).

    Unsigned, so that indexing with them compiles without numba's negative-index wrap-around (a third of the
    instructions of the counting loop)."""
    tok_ptr = np.zeros(n_tokens + 1, np.uint64)
    tok_cols = np.empty(len(cols), np.uint32)
    seen = np.full(d_sae, -1, np.int64)  # the last token that listed each latent
    nnz = 0
    for e in range(len(rows)):
        t, j = rows[e], cols[e]
        if seen[j] != t:
            seen[j] = t
            tok_cols[nnz] = j
            nnz += 1
            tok_ptr[t + 1] += _ONE
    lat_ptr = np.zeros(d_sae + 1, np.uint64)
    for e in range(nnz):
        lat_ptr[np.uint64(tok_cols[e]) + _ONE] += _ONE
    for t in range(n_tokens):
        tok_ptr[t + 1] += tok_ptr[t]
    for i in range(d_sae):
        lat_ptr[i + 1] += lat_ptr[i]
    fill = lat_ptr[:-1].copy()
    lat_tok = np.empty(nnz, np.uint32)
    pairs = 0
    for t in range(n_tokens):
        first, last = tok_ptr[t], tok_ptr[t + 1]
        pairs += (last - first) ** 2
        for e in range(first, last):
            j = tok_cols[e]
            lat_tok[fill[j]] = t
            fill[j] += _ONE
    return tok_ptr, tok_cols[:nnz], lat_ptr, lat_tok, pairs


@numba.njit(cache=True, nogil=True)
def _fill_rows(
    tok_ptr: np.ndarray,
    tok_cols: np.ndarray,
    lat_ptr: np.ndarray,
    lat_tok: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
) -> int:
    """Write ``B.T @ B`` row by row into the CSR arrays ``indptr [d_sae + 1]`` (``indptr[0] == 0``), ``indices`` and
    ``data`` (each at least ``sum_t |t|**2`` long); return its number of non-zeros. Row ``i`` sums the latent lists
    of the tokens where ``i`` is active; ``where[j]``, the position of column ``j`` in the output when it is at or
    after the current row's start, finds a repeat in one look-up (columns stay in first-seen order). Every index is
    unsigned (see :func:`_token_lists`)."""
    where = np.full(len(lat_ptr) - 1, -1, indptr.dtype)
    pos = np.uint64(0)
    for i in range(len(lat_ptr) - 1):
        start = np.int64(pos)
        for a in range(lat_ptr[i], lat_ptr[i + 1]):
            t = lat_tok[a]
            for e in range(tok_ptr[t], tok_ptr[t + _ONE]):
                j = tok_cols[e]
                w = where[j]
                if w >= start:
                    data[np.uint64(w)] += 1
                else:
                    where[j] = pos
                    indices[pos] = j
                    data[pos] = 1
                    pos += _ONE
        indptr[i + 1] = pos
    return int(pos)


def _batch_cooccurrence(rows: np.ndarray, cols: np.ndarray, n_tokens: int, d_sae: int) -> sp.csr_array:
    """``B.T @ B`` (int64 CSR ``[d_sae, d_sae]``, column indices unsorted within a row) of the boolean
    ``B [n_tokens, d_sae]``, 1 at ``(rows, cols)`` (rows ascending); a latent listed twice for one token is one
    activation.

    A numba kernel: one pass over the ``sum_t |t|**2`` pair increments with a ``[d_sae]`` look-up table, memory
    ``O(pairs + d_sae)``, never ``d_sae ** 2``. The output buffers are allocated by numpy (which asks the kernel
    for huge pages on large arrays, sparing most page faults) rather than inside the kernel.
    """
    tok_ptr, tok_cols, lat_ptr, lat_tok, pairs = _token_lists(
        rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False), n_tokens, d_sae
    )
    itype = np.int32 if max(pairs, d_sae) < 2**31 else np.int64  # int32 indices: less memory traffic
    indptr = np.zeros(d_sae + 1, itype)
    indices, data = np.empty(pairs, itype), np.empty(pairs, np.int64)
    nnz = _fill_rows(tok_ptr, tok_cols, lat_ptr, lat_tok, indptr, indices, data)
    indices, data = indices[:nnz], data[:nnz]
    if 2 * nnz < pairs:  # mostly repeated pairs: do not keep the unused buffer alive
        indices, data = indices.copy(), data.copy()
    return sp.csr_array((data, indices, indptr), shape=(d_sae, d_sae))


@numba.njit(cache=True, nogil=True)
def _sum_rows(
    indptrs: tuple[np.ndarray, ...],
    indices: tuple[np.ndarray, ...],
    data: tuple[np.ndarray, ...],
    out_indptr: np.ndarray,
    out_indices: np.ndarray,
    out_data: np.ndarray,
) -> int:
    """Write the sum of the CSR matrices ``(data[m], indices[m], indptrs[m])`` into ``out_indptr [n_rows + 1]``
    (``out_indptr[0] == 0``), ``out_indices`` and ``out_data`` (each as long as all the matrices' entries); return
    its number of non-zeros. Row ``i`` adds up row ``i`` of every matrix with a ``[n_columns]`` look-up table of
    where each column went (as :func:`_fill_rows`), so the columns stay in first-seen order."""
    where = np.full(len(out_indptr) - 1, -1, np.int64)
    pos = 0
    for i in range(len(out_indptr) - 1):
        start = pos
        for m in range(len(indptrs)):
            ptr, cols, values = indptrs[m], indices[m], data[m]
            for e in range(ptr[i], ptr[i + 1]):
                j = cols[e]
                w = where[j]
                if w >= start:
                    out_data[w] += values[e]
                else:
                    where[j] = pos
                    out_indices[pos] = j
                    out_data[pos] = values[e]
                    pos += 1
        out_indptr[i + 1] = pos
    return pos


def sum_counts(matrices: Sequence[sp.csr_array | sp.csr_matrix]) -> sp.csr_array:
    """The sum of square int64 CSR count matrices ``[d_sae, d_sae]`` (columns in any order within a row), added in
    one pass (:func:`_sum_rows`) rather than one matrix after another.

    Memory: the result's arrays, 12 bytes per non-zero with int32 indices (allocated for every matrix's entries,
    touched only as far as the sum's non-zeros), a ``[d_sae]`` look-up table, and a copy of the indices or indptr
    of a matrix whose index dtype is not the result's; not the ``len(matrices) - 1`` intermediate sums of adding
    them in turn."""
    if not matrices:
        raise ValueError("sum_counts needs at least one matrix")
    shape = matrices[0].shape
    if any(m.shape != shape for m in matrices) or shape[0] != shape[1]:
        raise ValueError(f"the count matrices must be square and of one shape, got {[m.shape for m in matrices]}")
    total = sum(m.nnz for m in matrices)
    itype = np.int32 if max(total, shape[0]) < 2**31 else np.int64  # scipy keeps int32 arrays as they are
    indptrs = tuple(np.asarray(m.indptr, np.int64) for m in matrices)  # tuples: numba caches their kernel on disk
    indices = tuple(np.asarray(m.indices, itype) for m in matrices)
    data = tuple(np.asarray(m.data, np.int64) for m in matrices)
    out_indptr = np.zeros(shape[0] + 1, itype)
    out_indices, out_data = np.empty(total, itype), np.empty(total, np.int64)
    nnz = _sum_rows(indptrs, indices, data, out_indptr, out_indices, out_data)
    return sp.csr_array((out_data[:nnz], out_indices[:nnz], out_indptr), shape=shape)


class CountSum:
    """A running sum of int64 count matrices ``[d_sae, d_sae]``, added one batch's counts at a time.

    Adding each batch's counts straight into the sum copies the whole sum once a batch: at width that is most of a
    count's time (93% at d_sae 131072, k 64 in ``benchmarks/cooccurrence_width.py``). Here the matrices wait on a
    stack, the sum at its bottom, each holding fewer than half the entries of the one below it; a new one is added
    to the one below it (one :func:`sum_counts` pass of the two) as long as it holds at least half as many, like
    the carries of a binary counter. So an entry is copied about ``log2(batches)`` times instead of once a batch,
    and the waiting matrices together hold fewer entries than the sum below them. :meth:`value` adds up the stack.
    """

    def __init__(self, total: sp.csr_array | None = None) -> None:
        self._stack: list[sp.csr_array] = [] if total is None else [total]

    def add(self, counts: sp.csr_array) -> None:
        """Add ``counts [d_sae, d_sae]`` (int64 CSR; columns in any order within a row)."""
        self._stack.append(counts)
        while len(self._stack) > 1 and 2 * self._stack[-1].nnz >= self._stack[-2].nnz:
            self._merge_top()

    def value(self) -> sp.csr_array:
        """The sum of everything added (and of the starting total); it becomes the stack's one matrix."""
        if not self._stack:
            raise ValueError("CountSum.value of an empty sum: add counts first")
        while len(self._stack) > 1:
            self._merge_top()
        return self._stack[0]

    def _merge_top(self) -> None:
        """Add the top matrix to the one below it (always two at a time: one compiled kernel)."""
        top = self._stack.pop()
        self._stack[-1] = sum_counts([self._stack[-1], top])


PAIR_BUDGET = 2**27  # pair increments a counter gathers before one kernel pass (int32 indices; 1.6 GB of address
# space for its output, of which only the distinct pairs are touched)


class CooccurrenceCounter:
    """Exact co-occurrence counts per activity threshold, fed one batch at a time (what
    :func:`count_cooccurrences` and ``cooc count`` run).

    The active entries of consecutive batches are gathered until they make ``pair_budget`` pair increments, then
    counted in one kernel pass (:func:`_batch_cooccurrence`), which adds up a pair repeated across those batches
    in its look-up table; the result joins a :class:`CountSum`. Memory: the gathered entries (16 bytes an active
    entry), one pass's distinct pairs, and the running sums.

    Args:
        thresholds: activity thresholds ``t``; latent ``i`` is active when its activation ``> t + sae_threshold[i]``
            (which must be >= 0).
        d_sae: the number of latents; may be None when ``sae_threshold`` is given or the batches are dense.
        sae_threshold: ``[d_sae]``, the SAE's own JumpReLU threshold, or None for 0.
        start: counts to continue from (a checkpoint's), ``{threshold: CooccurrenceCounts}``.
        pair_budget: pair increments gathered before a kernel pass.
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        d_sae: int | None = None,
        sae_threshold: Tensor | None = None,
        start: dict[float, CooccurrenceCounts] | None = None,
        pair_budget: int = PAIR_BUDGET,
    ) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.d_sae = sae_threshold.shape[-1] if sae_threshold is not None else d_sae
        self._base = None if sae_threshold is None else sae_threshold.detach().float().cpu()
        self._sums = {t: CountSum(c.counts) for t, c in (start or {}).items()}
        self.n_tokens = max((c.n_tokens for c in (start or {}).values()), default=0)
        self._budget = pair_budget
        self._gathered: dict[float, list[tuple[np.ndarray, np.ndarray]]] = {t: [] for t in self.thresholds}
        self._gathered_tokens = 0
        self._gathered_pairs = 0

    def add(self, batch: LatentsLike, exclude: Tensor | None = None) -> None:
        """Count one batch: dense ``[..., d_sae]`` or sparse (see :func:`count_cooccurrences`); ``exclude``: a bool
        tensor of the batch's leading shape, True for tokens not to count."""
        if self.d_sae is None:
            self.d_sae = dense_width(batch)
            if self.d_sae is None:
                raise ValueError("sparse batches need d_sae= (or sae_threshold=) to know the number of latents")
        latents = as_sparse(batch)
        leading = latents.values.shape[:-1]
        keep = None
        if exclude is not None:
            if exclude.shape != leading:
                raise ValueError(f"exclude mask shape {tuple(exclude.shape)} != batch shape {tuple(leading)}")
            keep = ~exclude.bool()
        base = self._base if self._base is not None else torch.zeros(self.d_sae)
        latents = SparseLatents(latents.indices.cpu(), latents.values.detach().cpu())
        tokens, most = 0, 0
        for t in self.thresholds:
            rows, cols, tokens = _active(latents, base + t, keep)
            self._gathered[t].append((rows + self._gathered_tokens, cols))
            most = max(most, int(np.square(np.bincount(rows, minlength=tokens)).sum()))
        self._gathered_tokens += tokens
        self._gathered_pairs += most
        self.n_tokens += tokens
        if self._gathered_pairs >= self._budget:
            self._count_gathered()

    def _count_gathered(self) -> None:
        """One kernel pass per threshold over the gathered entries, added to the running sums."""
        assert self.d_sae is not None  # set by the first batch
        for t, parts in self._gathered.items():
            if parts:
                rows, cols = (np.concatenate(a) for a in zip(*parts, strict=True))
                counts = _batch_cooccurrence(rows, cols, self._gathered_tokens, self.d_sae)
                self._sums.setdefault(t, CountSum()).add(counts)
            parts.clear()
        self._gathered_tokens = self._gathered_pairs = 0

    def counts(self) -> dict[float, CooccurrenceCounts]:
        """``{float(t): CooccurrenceCounts}`` of everything counted so far, in the order of ``thresholds``."""
        if self.d_sae is None:
            raise ValueError("no batches to count, and no d_sae= or sae_threshold= to size empty counts")
        self._count_gathered()
        empty = sp.csr_array((self.d_sae, self.d_sae), dtype=np.int64)
        return {
            t: CooccurrenceCounts(t, self._sums[t].value() if t in self._sums else empty, self.n_tokens)
            for t in self.thresholds
        }


def count_cooccurrences(
    batches: Iterable[LatentsLike],
    thresholds: Sequence[float],
    sae_threshold: Tensor | None = None,
    exclude: Iterable[Tensor] | None = None,
    d_sae: int | None = None,
    progress: bool = True,
) -> dict[float, CooccurrenceCounts]:
    """Exact co-occurrence counts per activity threshold over all ``batches`` (a :class:`CooccurrenceCounter` fed
    every batch).

    Args:
        batches: latent activations, each dense ``[..., d_sae]`` or sparse (:class:`~mechscope.sae.SparseLatents`
            or an ``(indices, values)`` pair of ``[..., k]`` tensors, as ``SparseAutoencoder.encode_sparse``
            returns; padding entries with value 0 are never active); all become ``SparseLatents``
            (:func:`~mechscope.sae.latents.as_sparse`). Leading dimensions are flattened into tokens.
        thresholds: activity thresholds ``t``; latent ``i`` is active when its activation ``> t + sae_threshold[i]``
            (which must be >= 0).
        sae_threshold: ``[d_sae]``, the SAE's own JumpReLU threshold, or None for 0.
        exclude: one bool tensor ``[...]`` per batch (the batch's leading shape), True for tokens not to count
            (e.g. BOS/EOS/PAD positions).
        d_sae: the number of latents; needed only for sparse batches without ``sae_threshold``.
        progress: show a progress bar over the batches.

    Returns:
        ``{float(t): CooccurrenceCounts}`` in the order of ``thresholds``.
    """
    counter = CooccurrenceCounter(thresholds, d_sae=d_sae, sae_threshold=sae_threshold)
    masks = iter(exclude) if exclude is not None else None
    for batch in tqdm(batches, desc="co-occurrence", unit="batch", leave=False, disable=not progress):
        mask = None
        if masks is not None:
            mask = next(masks, None)
            if mask is None:
                raise ValueError("exclude has fewer masks than there are batches")
        counter.add(batch, mask)
    return counter.counts()


def jaccard(counts: CooccurrenceCounts | sp.sparray | np.ndarray) -> sp.csr_array:
    """Jaccard ``J [d_sae, d_sae]`` (float32 CSR): ``C_ij / (C_ii + C_jj - C_ij)``, 0 where ``C_ij = 0``; on the
    diagonal 1 for a latent that was active and 0 for one that never was (``0 / 0``, which the reference's
    ``calculate_jaccard_matrices_chunked`` turns into 0)."""
    c = sp.csr_array(counts.counts if isinstance(counts, CooccurrenceCounts) else counts)
    c.sum_duplicates()
    n = c.shape[0]
    diag = c.diagonal().astype(np.float64)
    rows = np.repeat(np.arange(n), np.diff(c.indptr))
    inter = c.data.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = inter / (diag[rows] + diag[c.indices] - inter)
    values[(rows == c.indices) | (inter == 0)] = 0.0  # the diagonal is set below; explicit zeros stay 0
    j = sp.csr_array((values.astype(np.float32), c.indices.copy(), c.indptr.copy()), shape=c.shape)
    j.eliminate_zeros()
    out = (j + sp.diags_array((diag > 0).astype(np.float32), dtype=np.float32, format="csr")).tocsr()
    out.eliminate_zeros()
    return out
