"""Dashboards of every latent of a demo-sized SAE: the wall time of ``compute_dashboards`` and where it goes.

    python benchmarks/dashboards.py [--threads 2] [--repeats 3]

The demo's shape: a TopK SAE (d_in 576, d_sae 4608, k 32) over 131,072 stored rows in shards of 65,536 (random
activations, so every latent fires), SmolLM2's vocabulary (49,152) for the logit effects. The goal is under 60 s on
2 cores. The floor is the SAE's encoding: three passes each encode every row once; the rest is selection, windows
and logit effects. The last line is one checkpoint of the largest state (the third pass's, windows included), which
the dashboards stage writes every ``checkpoint_seconds`` (60 s by default).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mechscope.dashboards.build import DashboardState, chunk_list, compute_dashboards
from mechscope.dashboards.logit_effects import logit_effects
from mechscope.dashboards.outputs import save_checkpoint
from mechscope.sae import SAE, SAEConfig

D_IN, D_SAE, K, ROWS, SHARD, VOCAB, CONTEXT = 576, 4608, 32, 131072, 65536, 49152, 127


def setup() -> tuple[SAE, list[dict[str, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(D_IN, D_SAE, "topk", k=K, hook_name="blocks.15.hook_resid_post")).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / D_IN**0.5)
    context = torch.arange(ROWS) // CONTEXT
    shards = [
        {
            "blocks.15.hook_resid_post": torch.randn(SHARD, D_IN, generator=g),
            "tokens": torch.randint(0, VOCAB, (SHARD,), generator=g),
            "context": context[s : s + SHARD],
            "position": torch.arange(s, s + SHARD) % CONTEXT + 1,
        }
        for s in range(0, ROWS, SHARD)
    ]
    return sae, shards, torch.randn(D_IN, VOCAB, generator=g)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sae, shards, W_U = setup()  # noqa: N806

    def encode_three_passes() -> None:
        with torch.no_grad():
            for _ in range(3):
                for rows in shards:
                    sae.encode_sparse(rows["blocks.15.hook_resid_post"])

    last: list[DashboardState] = []

    def keep(state: DashboardState) -> None:
        last[:] = [state]

    def dashboards() -> None:
        compute_dashboards(
            sae, "blocks.15.hook_resid_post", chunk_list(shards), W_U, None, progress=False, on_chunk=keep
        )

    checkpoints = tempfile.TemporaryDirectory()
    parts = {
        "compute_dashboards (all)": dashboards,
        "of which: SAE encoding, 3 passes": encode_three_passes,
        "of which: logit effects": lambda: logit_effects(sae.W_dec.detach(), W_U),
        "one checkpoint of the pass 3 state": lambda: save_checkpoint(checkpoints.name, last[0], {}),
    }
    results = {name: [timed(fn) for _ in range(args.repeats)] for name, fn in parts.items()}
    print(f"{D_SAE} latents, {ROWS:,} rows, {args.threads} torch threads, {args.repeats} runs each (median, min-max):")
    for name, times in results.items():
        print(f"  {name:36s} {statistics.median(times):6.1f} s  ({min(times):.1f}-{max(times):.1f})")
    checkpoints.cleanup()


if __name__ == "__main__":
    main()
