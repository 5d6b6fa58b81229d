"""Co-occurrence counting at width: 131,072 latents, synthetic TopK activations (k 64), 1,048,576 tokens, in one
process or in N under ``torchrun`` (gloo, one torch thread each); prints tokens/s and each rank's peak RSS. A plain
script, not in ``run.py``'s registry: no peer can count at this width (the dense reference ``B.T @ B`` needs
``131072**2`` int32 = 68.7 GB per matrix), so there is nothing to run side by side.

It runs ``cooc count``'s own code without a model: batch ``i`` is counted by rank ``i % N`` with
the pipeline's ``CooccurrenceCounter`` (which counts the tokens of several batches in one kernel pass); every
``--sum-every`` batches (the count's ``checkpoint_every``, 50 by default; 0: only at the end) and at the end the
ranks' sparse partials are summed on rank 0 by the pipeline's ``_sum_ranks`` (no checkpoint file is written).

**The activations are structured**, as real SAE latents are (a latent co-occurs with a limited set of others):
uniformly random latents would give ~2e9 distinct pairs over 1M tokens (2016 pairs a token), which no sparse format
holds in 8 GB. The ``d_sae`` latents (in a fixed random order) form clusters of ``CLUSTER`` latents; each token
picks a cluster with Zipf-like frequency (``1 / rank``), draws ``K - SIDE`` distinct latents from it and ``SIDE``
from the next cluster, each without replacement with Zipf-like weights (``rank ** -0.8``) inside the cluster. So a
latent's frequency falls off like a Zipf law, and the distinct pairs are at most ``clusters * CLUSTER**2 * 3``
ordered pairs (100.7M at d_sae 131072). Batches are drawn on the fly from ``(seed, batch index)``, never stored, so
each rank draws only its own.

Before the timed run, the counts of ``CHECK_BATCHES`` batches at d_sae 4096 (same generator, counted and summed
over the ranks as above) are compared entry for entry with a dense ``B.T @ B``; after it, the total's diagonal
must sum to ``tokens * K`` (every token has ``K`` distinct active latents).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cooccurrence_width.py
    PYTHONPATH=$PWD .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/cooccurrence_width.py
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from mechscope import distributed
from mechscope.cooccurrence.counting import CooccurrenceCounter
from mechscope.cooccurrence.outputs import Counts
from mechscope.cooccurrence.pipeline import _sum_ranks, _totals
from mechscope.sae.latents import SparseLatents

D_SAE, K, BATCH, CLUSTER, SIDE = 131072, 64, 4096, 256, 8
CHECK_D_SAE, CHECK_BATCHES = 4096, 4
HOOK = "synthetic"


class Activations:
    """Deterministic structured TopK latents of ``d_sae`` latents (see the module's docstring), batch by batch."""

    def __init__(self, d_sae: int, seed: int) -> None:
        self.d_sae, self.seed = d_sae, seed
        self.clusters = d_sae // CLUSTER
        self.order = torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed))  # latent id of each slot
        self.cluster_weights = 1.0 / torch.arange(1, self.clusters + 1, dtype=torch.float64)
        self.log_weights = -0.8 * torch.log(torch.arange(1, CLUSTER + 1, dtype=torch.float32))  # within a cluster

    def batch(self, index: int) -> SparseLatents:
        """Batch ``index``: ``indices [BATCH, K]`` (``K`` distinct latents a token) and ``values [BATCH, K]`` > 0."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        cluster = torch.multinomial(self.cluster_weights, BATCH, replacement=True, generator=g)

        def draw(clusters: torch.Tensor, n: int) -> torch.Tensor:  # Gumbel top-n: n distinct, without replacement
            gumbel = -torch.log(-torch.log(torch.rand(BATCH, CLUSTER, generator=g).clamp_min(1e-12)))
            return clusters[:, None] * CLUSTER + (self.log_weights + gumbel).topk(n, dim=1).indices

        slots = torch.cat([draw(cluster, K - SIDE), draw((cluster + 1) % self.clusters, SIDE)], dim=1)
        return SparseLatents(self.order[slots], torch.rand(BATCH, K, generator=g) + 0.1)


def count(activations: Activations, n_batches: int, sum_every: int, timings: dict[str, float]) -> Counts:
    """``cooc count``'s loop over ``n_batches`` batches: this rank counts its own, the ranks' partials are summed on
    rank 0 every ``sum_every`` batches and at the end. Rank 0 returns ``{HOOK: {0.0: counts}}``, the others ``{}``.
    Adds the seconds spent drawing, counting (with adding) and summing to ``timings``."""
    running = {HOOK: CooccurrenceCounter([0.0], activations.d_sae)}
    for b in range(n_batches):
        if distributed.owns(b):
            start = time.perf_counter()
            latents = activations.batch(b)
            drawn = time.perf_counter()
            running[HOOK].add(latents)
            timings["draw"] += drawn - start
            timings["count"] += time.perf_counter() - drawn
        if (b + 1) % 32 == 0:
            distributed.print_main(f"{b + 1} of {n_batches} batches, {time.strftime('%H:%M:%S')}", flush=True)
        if (sum_every and (b + 1) % sum_every == 0) or b + 1 == n_batches:
            if b + 1 == n_batches:
                timings["peak_before_last_sum_gb"] = peak_rss_gb()
            start = time.perf_counter()
            n_tokens = (b + 1) * BATCH
            counts = _sum_ranks(_totals(running, n_tokens), n_tokens, {HOOK: activations.d_sae}, [0.0])
            running = {HOOK: CooccurrenceCounter([0.0], activations.d_sae, start=counts.get(HOOK))}
            timings["sum"] += time.perf_counter() - start
    return counts


def check(n_ranks: int) -> None:
    """The counts of ``CHECK_BATCHES`` batches at d_sae ``CHECK_D_SAE``, counted and summed as :func:`count` does,
    against a dense ``B.T @ B`` (rank 0 raises on a difference)."""
    activations = Activations(CHECK_D_SAE, seed=1)
    counts = count(activations, CHECK_BATCHES, 0, dict.fromkeys(("draw", "count", "sum"), 0.0))
    if not distributed.is_main():
        return
    dense = torch.zeros(CHECK_D_SAE, CHECK_D_SAE, dtype=torch.int64)
    for b in range(CHECK_BATCHES):
        latents = activations.batch(b)
        active = torch.zeros(BATCH, CHECK_D_SAE).scatter_(1, latents.indices, 1.0)
        dense += (active.T @ active).long()  # exact: every entry <= BATCH < 2**24
    got = counts[HOOK][0.0]
    if not np.array_equal(got.counts.toarray(), dense.numpy()):
        raise AssertionError(f"the counts of {CHECK_BATCHES} batches over {n_ranks} ranks differ from B.T @ B")
    nnz = int((dense > 0).sum())
    print(f"check: {CHECK_BATCHES} batches at d_sae {CHECK_D_SAE} over {n_ranks} ranks = dense B.T @ B ({nnz} nnz)")


def peak_rss_gb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``, KiB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2**20, help="tokens to count (a multiple of 4096)")
    parser.add_argument("--sum-every", type=int, default=50, help="batches between sums on rank 0 (0: at the end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed.session():
        n_ranks = distributed.world_size()
        check(n_ranks)
        activations = Activations(D_SAE, args.seed)
        n_batches = args.tokens // BATCH
        timings = dict.fromkeys(("draw", "count", "sum"), 0.0)
        timings["peak_before_gb"] = peak_rss_gb()
        distributed.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        counts = count(activations, n_batches, args.sum_every, timings)
        timings["cpu"] = time.process_time() - cpu  # waiting at the barrier below excluded
        distributed.barrier()
        wall = time.perf_counter() - start
        timings["peak_gb"] = peak_rss_gb()
        ranks = distributed.gather_to_main([timings], lambda a, b: a + b)
        if ranks is None:
            return
    total = counts[HOOK][0.0]
    diagonal = int(total.activations.sum())
    if diagonal != total.n_tokens * K:
        raise AssertionError(f"the diagonal sums to {diagonal}, not {total.n_tokens} tokens * {K}")
    active = int((total.activations > 0).sum())
    pairs = (total.counts.nnz - active) // 2
    print(
        f"{n_ranks} rank(s), {total.n_tokens} tokens in {n_batches} batches of {BATCH}, d_sae {D_SAE}, k {K}, "
        f"sum every {args.sum_every or n_batches} batches: {wall:.1f} s, {total.n_tokens / wall:,.0f} tokens/s"
    )
    print(
        f"counts: {total.counts.nnz:,} non-zeros ({pairs:,} distinct pairs of distinct latents, {active:,} latents "
        f"active), {(total.counts.data.nbytes + total.counts.indices.nbytes) / 1e9:.2f} GB of data and indices"
    )
    for r, t in enumerate(ranks):
        print(
            f"rank {r}: peak RSS {t['peak_gb']:.2f} GB (after imports and the check {t['peak_before_gb']:.2f} GB, "
            f"before the last sum {t['peak_before_last_sum_gb']:.2f} GB); CPU {t['cpu']:.0f} s; wall: draw "
            f"{t['draw']:.1f} s, count and add {t['count']:.1f} s, sum to rank 0 {t['sum']:.1f} s"
        )
    print(f"peak RSS summed over ranks: {sum(t['peak_gb'] for t in ranks):.2f} GB")


if __name__ == "__main__":
    main()
