"""The co-occurrence counting kernel of one batch (``B.T @ B`` of the boolean ``[tokens, d_sae]`` activity) against
the formulation it replaced and against the floor: generating every pair once.

The batch is 4096 tokens with 64 active latents each (drawn uniformly without replacement per token, so
4096 * 64**2 = 16.8M pair increments) at d_sae 24576 and 131072; :func:`setup` checks that the kernel and the
previous formulation give the same counts entry for entry.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from harness import Benchmark, Ratio

from mechscope.cooccurrence.counting import _batch_cooccurrence

TOKENS, ACTIVE = 4096, 64
WIDTHS = (24576, 131072)


def previous_formulation(rows: np.ndarray, cols: np.ndarray, n_tokens: int, d_sae: int) -> sp.csr_array:
    """BASELINE ONLY (mechscope's counting before the numba kernel): scipy's sparse product ``B.T @ B``."""
    itype = np.int32 if max(n_tokens, d_sae, len(rows)) < 2**31 else np.int64
    ones = np.ones(len(rows), dtype=np.int64)
    b = sp.csr_array((ones, (rows.astype(itype), cols.astype(itype))), shape=(n_tokens, d_sae))
    b.data[:] = 1
    return (b.T.tocsr() @ b).tocsr()


def pair_keys(indices: np.ndarray, d_sae: int) -> np.ndarray:
    """The floor: ``[tokens, k, k]`` int64 keys ``i * d_sae + j`` of every pair of every token, each made once."""
    wide = indices.astype(np.int64)
    return wide[:, :, None] * d_sae + wide[:, None, :]


def setup() -> Benchmark:
    """Draw one batch per width, check kernel == previous formulation, and return the contenders."""
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(TOKENS, dtype=np.int64), ACTIVE)
    contenders, ratios, notes = {}, [], []
    for d_sae in WIDTHS:
        indices = np.stack([rng.choice(d_sae, ACTIVE, replace=False) for _ in range(TOKENS)])  # [tokens, 64]
        cols = indices.reshape(-1).astype(np.int64)
        kernel, previous = (
            _batch_cooccurrence(rows, cols, TOKENS, d_sae),
            previous_formulation(rows, cols, TOKENS, d_sae),
        )
        if kernel.dtype != np.int64 or (kernel != previous).nnz or kernel.nnz != previous.nnz:
            raise AssertionError(f"the kernel's counts differ from the previous formulation's at d_sae {d_sae}")
        if pair_keys(indices, d_sae).size != int(kernel.sum()):
            raise AssertionError("the floor does not make one key per pair increment")
        notes.append(
            f"d_sae {d_sae}: sanity check, the kernel's int64 counts equal the previous formulation's entry for "
            f"entry ({kernel.nnz:,} non-zero counts, {int(kernel.sum()):,} pair increments = floor keys)."
        )
        contenders |= {
            f"kernel {d_sae}": lambda c=cols, d=d_sae: _batch_cooccurrence(rows, c, TOKENS, d),
            f"previous (scipy B.T @ B) {d_sae}": lambda c=cols, d=d_sae: previous_formulation(rows, c, TOKENS, d),
            f"floor (pair keys) {d_sae}": lambda i=indices, d=d_sae: pair_keys(i, d),
        }
        ratios += [
            Ratio(f"kernel {d_sae}", f"previous (scipy B.T @ B) {d_sae}", target=1 / 3),
            Ratio(f"kernel {d_sae}", f"floor (pair keys) {d_sae}"),
        ]
    return Benchmark(
        description=(
            f"One batch of {TOKENS} tokens with {ACTIVE} active latents per token, from the `(token, latent)` pairs "
            "of its active entries to the int64 CSR counts `B.T @ B`: mechscope's numba kernel "
            "(`counting._batch_cooccurrence`: one pass over the pair increments, row by row, with a `[d_sae]` "
            "table of where each column of the current row was written, every index unsigned so that numba "
            "compiles no negative-index wrap-around into the inner loop; one thread) against the formulation it "
            "replaced (scipy's sparse product, kept in this file only as the baseline) and against the floor, the "
            "time to write one int64 key per pair increment (the `[tokens, k, k]` pair index array, numpy "
            "broadcasting). A ratio ≤ 0.33 is a kernel at least 3× faster."
        ),
        contenders=contenders,
        ratios=ratios,
        notes=notes,
        repeats=20,
    )
