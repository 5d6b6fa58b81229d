"""What a count checkpoint costs next to counting a batch, at a wide SAE (why the count checkpoints every 50 batches
or 300 s, not every batch). A plain script, not in ``run.py``'s registry: there is no peer to compare with.

Batches of 4096 tokens with 32 active latents each of d_sae latents, drawn without replacement from a Zipf-like
distribution (a few frequent latents and a long tail, as real SAEs have); every 5 batches it prints the time to count
a batch and add it to the total, and the time and size of ``save_checkpoint`` of the total.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/count_checkpoint_cost.py [--d-sae 16384] [--batches 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mechscope.cooccurrence.counting import CooccurrenceCounts, count_cooccurrences
from mechscope.cooccurrence.outputs import save_checkpoint
from mechscope.sae.latents import SparseLatents

TOKENS, K = 4096, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weights = (1.0 / torch.arange(1, args.d_sae + 1).float() ** 0.8).expand(TOKENS, args.d_sae)
    total: CooccurrenceCounts | None = None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "count_checkpoint.npz"
        for b in range(1, args.batches + 1):
            indices = torch.multinomial(weights, K, generator=g)
            latents = SparseLatents(indices, torch.rand(TOKENS, K, generator=g) + 0.1)
            start = time.perf_counter()
            batch = count_cooccurrences([latents], [0.0], d_sae=args.d_sae, progress=False)[0.0]
            total = batch if total is None else CooccurrenceCounts(0.0, (total.counts + batch.counts).tocsr(), 0)
            counted = time.perf_counter()
            if b % 5 == 0:
                state = {"settings": {}, "sae_ids": ["h"], "thresholds": [0.0], "batches_done": b, "n_tokens": 0}
                save_checkpoint(path, {**state, "next": [0, 0]}, {"h": {0.0: total}})
                saved = time.perf_counter()
                print(
                    f"batch {b}: count + add {counted - start:.2f} s, checkpoint {saved - counted:.2f} s "
                    f"({path.stat().st_size / 1e6:.0f} MB, {total.counts.nnz / 1e6:.1f}M non-zeros)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
