"""A benchmark worker of ``distributed.py``: one rank (of 1 or of N, started with torchrun's variables set) that
runs a unit of work each time rank 0 reads its name on stdin, and prints on rank 0 ``done CPU`` when every rank
has finished it (CPU: rank 0's CPU seconds for the unit). Units: ``train`` (``STEPS`` TopK training steps of
``Trainer.train_step`` on ``BATCH`` rows, each rank computing its share) and ``count`` (co-occurrence counts of
``N_BATCHES`` batches of synthetic TopK latents, batch ``i`` counted by rank ``i % N``, the sparse partial counts
summed on rank 0, as ``cooc count`` does at a checkpoint) and ``harvest`` (``HARVEST_TOKENS`` tokens of
SmolLM2-135M's ``blocks.15.hook_resid_post`` into a fresh directory, each rank harvesting its half of the shards).
``quit`` ends it. One torch thread per rank."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from mechscope import distributed
from mechscope.cooccurrence.counting import count_cooccurrences
from mechscope.cooccurrence.pipeline import _sum_ranks as sum_ranks  # what `cooc count` does at a checkpoint
from mechscope.data.store import ActivationStore
from mechscope.models.hooked import HookedModel
from mechscope.sae import SAE, SAEConfig
from mechscope.sae.latents import SparseLatents
from mechscope.sae.train import TrainConfig, Trainer

D_IN, D_SAE, K, BATCH, STEPS = 256, 4096, 32, 4096, 4
COUNT_D_SAE, COUNT_K, COUNT_BATCH, N_BATCHES = 16384, 32, 4096, 50  # 50: the count's checkpoint_every
# 16 contexts of 128 tokens (the BOS is not stored: 507 or 508 rows a pass), forward passes of 4 contexts, one pass a
# shard: 4 shards, 2 per rank (with the store's default of 8 contexts a pass, 3 shards: 2 and 1, at most 1.5x)
HARVEST_TOKENS, HARVEST_PASS, HARVEST_SHARD = 2000, 4, 500


def training() -> Callable[[], object]:
    """``STEPS`` training steps of a TopK SAE (d_in 256, d_sae 4096, k 32; every latent dead, so AuxK runs)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, D_IN, generator=g) for _ in range(STEPS)]
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K)).train()
    config = TrainConfig(
        model="synthetic", hook_name="x", architecture="topk", d_sae=D_SAE, k=K, batch_size_tokens=BATCH,
        n_tokens=BATCH * 10**6, warmup_steps=0, dead_tokens_threshold=1, out_dir=tempfile.gettempdir(),
    )  # fmt: skip
    trainer = Trainer(config, sae)
    trainer.tokens_since_fired.fill_(1)

    def run() -> None:
        for batch in batches:
            trainer.train_step(batch)
            trainer.tokens_since_fired.fill_(1)  # keep AuxK on: the same work every call

    return run


def counting() -> Callable[[], object]:
    """Counts of ``N_BATCHES`` batches of ``COUNT_BATCH`` tokens of TopK latents (d_sae 16384, k 32), summed."""
    g = torch.Generator().manual_seed(1)
    popularity = torch.rand(COUNT_D_SAE, generator=g) ** 4  # some latents fire far more often than others
    batches = []
    for _ in range(N_BATCHES):
        indices = torch.multinomial(popularity, COUNT_K * COUNT_BATCH, replacement=True, generator=g)
        values = torch.rand(COUNT_BATCH, COUNT_K, generator=g)
        batches.append(SparseLatents(indices.view(COUNT_BATCH, COUNT_K), values))

    def run() -> None:
        mine = [b for i, b in enumerate(batches) if distributed.owns(i)]
        counts = count_cooccurrences(mine, [0.0], d_sae=COUNT_D_SAE, progress=False)
        sum_ranks({"x": counts}, COUNT_BATCH * N_BATCHES, {"x": COUNT_D_SAE}, [0.0])

    return run


def harvesting() -> Callable[[], object]:
    """A harvest of ``HARVEST_TOKENS`` tokens of the embedded corpus at ``blocks.15.hook_resid_post`` of SmolLM2-135M
    (the offline GGUF) into a fresh directory (removed after), shards of ``HARVEST_SHARD`` rows shared out among the
    ranks as ``mechscope sae train`` and ``cooc count`` share them."""
    model = HookedModel.from_pretrained("smollm2-135m")

    def run() -> None:
        directory = distributed.broadcast(tempfile.mkdtemp(prefix="harvest-") if distributed.is_main() else "")
        store = ActivationStore(
            model,
            "blocks.15.hook_resid_post",
            activations_dir=directory,
            batch_contexts=HARVEST_PASS,
            shard_tokens=HARVEST_SHARD,
        )
        store.harvest(HARVEST_TOKENS, progress=False, data_parallel=True)
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(directory)

    return run


def main() -> None:
    torch.set_num_threads(1)
    with distributed.session():
        units = {"train": training(), "count": counting(), "harvest": harvesting()}
        while True:
            name = distributed.broadcast(sys.stdin.readline().strip() if distributed.is_main() else "")
            if name == "quit" or not name:
                break
            cpu = time.process_time()
            units[name]()
            cpu = time.process_time() - cpu  # this rank's CPU seconds, waiting at the barrier excluded
            distributed.barrier()
            if distributed.is_main():
                print(f"done {cpu:.3f}", flush=True)


if __name__ == "__main__":
    main()
