"""The work the distributed tests run under ``torchrun``: ``python job.py TASKS.json`` runs each task of the JSON
list on this rank, on the same tiny random llama and SAEs the single-process side of the tests builds
(:func:`tiny_model`, :func:`tiny_saes`), inside :func:`mechscope.distributed.session`.

Tasks: ``{"kind": "count", "config": {CoocConfig fields}, "kill": [rank, batch]}``; with ``kill``, that rank ends
itself with ``os._exit(1)`` after counting that batch (once rank 0 has written a checkpoint), as a kill would.
With ``"stop": [rank, batch]`` that rank alone sends itself SIGINT after that batch; the :class:`Interrupted` each
rank raises is written to ``results_dir.RANK.json``.
``{"kind": "evaluate" | "collectives" | "autograd_sums", "out": PATH}`` write what each rank got to
``PATH.RANK.json``.
``{"kind": "dashboards", "config": {dashboards_config arguments}, "kill": [rank, pass, key], "stop": [rank, pass,
key]}``: ``run_dashboards``; with ``kill`` that rank ends itself after that chunk (once rank 0 has written the
checkpoint of the round before), with ``stop`` it sends itself SIGINT there and the :class:`Interrupted` each rank
gets is written to ``out_dir.RANK.json``.
``{"kind": "harvest", "activations_dir": PATH, "corpus": PATH, "kill": [rank, first_context], "slow_plan": rank}``:
a shared harvest (:func:`harvest_store`); with ``kill`` that rank ends itself before storing the forward pass from
that context; with ``slow_plan`` that rank plans the shards 2 s after the others.
``"shard_tokens": N`` in a count task makes its harvest write shards of N rows (:func:`stage_shards`) and each
rank write the shard files it harvested to ``results_dir.RANK.json``.
``{"kind": "train_store", "config": {store_train_config arguments}, "shard_tokens": N}`` trains on the tiny llama
after a harvest in shards of N rows, each rank writing the files it harvested to ``out_dir.RANK.json``.
``{"kind": "train", "config": {TrainConfig fields}, "signal": [rank, batch], "stop_after": M, "out": PATH}``
trains an SAE on :class:`SyntheticRows` (:func:`train_task`), that rank sending itself SIGINT at that batch;
``"kind": "train_alone"`` does so in rank 0 alone, before the ranks join the process group (a run that two ranks
then resume).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from mechscope import HookedModel, distributed
from mechscope.cooccurrence.config import CoocConfig, CountingConfig
from mechscope.cooccurrence.pipeline import CHECKPOINT, run_count
from mechscope.dashboards.build import DashboardSettings, DashboardState
from mechscope.dashboards.outputs import read_checkpoint_meta
from mechscope.dashboards.pipeline import DashboardsConfig, run_dashboards
from mechscope.data.store import ActivationStore
from mechscope.interrupts import Interrupted
from mechscope.sae import SAEConfig, SparseAutoencoder, evaluate_sae
from mechscope.sae.train import TrainConfig, train_sae
from tests.conftest import build_pair
from tests.sae_utils import random_weights

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]
TEXT = (
    "Sparse autoencoders split a model's activations into many latents, few of them active on any one token. "
    "Latents that fire together on the same tokens form groups, and the groups span small subspaces whose "
    "geometry tells us how the model composes features. Counting which latents fire together is exact here: "
    "each batch of tokens becomes a sparse boolean matrix and its product with itself adds to the counts. "
)


def tiny_model() -> HookedModel:
    """The random llama of the tests (the same weights in every process)."""
    return build_pair("llama", seed=1)[0]


def tiny_saes() -> dict[str, SparseAutoencoder]:
    """A TopK SAE on block 1 and a JumpReLU SAE on block 0, 48 latents each."""
    saes = {}
    for seed, (hook, arch) in enumerate(zip(HOOKS, ["topk", "jumprelu"], strict=True)):
        sae = SparseAutoencoder(
            SAEConfig(d_in=64, d_sae=48, architecture=arch, k=6 if arch == "topk" else None, hook_name=hook)
        )
        weights = random_weights(64, 48, seed, threshold=arch == "jumprelu")
        sae.load_state_dict({name: weights[name] for name in sae.state_dict()})
        saes[hook] = sae.eval()
    return saes


def cooc_config(results_dir: str | Path, corpus: str | Path, **counting: Any) -> CoocConfig:
    """Counting of 7 batches of 23 rows (batches end inside forward passes of 3 contexts of 16 tokens)."""
    settings = {
        "model": "random-llama",
        "corpus": str(corpus),
        "context_length": 16,
        "batch_contexts": 3,
        "batch_size_tokens": 23,
        "n_batches": 7,
        "checkpoint_every": 2,
        "activation_thresholds": [0.0, 0.3],
        **counting,
    }
    return CoocConfig(CountingConfig(**settings), results_dir=str(results_dir))


def _killer(results_dir: str, kill: list[int] | None, stop: list[int] | None = None):
    """The ``on_batch`` that ends rank ``kill[0]`` after batch ``kill[1]``, once a checkpoint is on disk, or that
    sends rank ``stop[0]`` alone SIGINT after batch ``stop[1]``."""
    if stop is not None and distributed.rank() == stop[0]:
        return lambda done, rows: signal.raise_signal(signal.SIGINT) if done == stop[1] else None
    if kill is None or distributed.rank() != kill[0]:
        return None

    def on_batch(done: int, rows: object) -> None:
        if done == kill[1]:
            deadline = time.monotonic() + 20
            while not (Path(results_dir) / CHECKPOINT).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(1)

    return on_batch


def eval_tokens() -> torch.Tensor:
    """``[5, 12]`` token ids: three batches of 2 for two ranks, one of them short."""
    return torch.randint(3, 1000, (5, 12), generator=torch.Generator().manual_seed(3))


def evaluation(model: HookedModel, saes: dict[str, SparseAutoencoder]) -> dict[str, Any]:
    """The figures of ``evaluate_sae`` of the TopK SAE, with the firing counts, as JSON."""
    result = evaluate_sae(model, saes[HOOKS[0]], tokens=eval_tokens(), batch_size=2, progress=False)
    return {**result.to_dict(), "firing_counts": result.firing_counts.tolist()}


def _write_rank(out: str, value: Any) -> None:
    """Write this rank's ``value`` to ``out.RANK.json``."""
    Path(f"{out}.{distributed.rank()}.json").write_text(json.dumps(value))


def _collectives(out: str) -> None:
    """Write what each helper of :mod:`mechscope.distributed` gives this rank to ``out.RANK.json``."""
    r = distributed.rank()
    ints = torch.arange(4, dtype=torch.int64) * (r + 1) + 2**40  # sums past 2**32 stay exact
    gathered = distributed.all_gather(torch.full((r + 1, 2), float(r)))  # ranks give different lengths
    mine = [torch.arange(3 * r, dtype=torch.int64) + 2**40, torch.full((r + 1,), r, dtype=torch.int32)]  # 0 and 3 long
    tensors = distributed.gather_tensors_to_main(mine)
    result = {
        "rank": r,
        "world": distributed.world_size(),
        "share": list(distributed.share(7)),
        "sum": distributed.all_reduce_sum(ints).tolist(),
        "gathered": [g.tolist() for g in gathered],
        "broadcast": distributed.broadcast({"from": r}),
        "to_main": distributed.gather_to_main([r], lambda a, b: a + b),
        "tensors_to_main": None if tensors is None else [[t.tolist() for t in ts] for ts in tensors],
    }
    distributed.barrier()
    _write_rank(out, result)


def _autograd_sums(out: str) -> None:
    """Write to ``out.RANK.json`` what :func:`~mechscope.distributed.sum_over_ranks` and
    :func:`~mechscope.distributed.sum_gradient_over_ranks` give this rank, forward and backward: rank ``r``'s part is
    ``[1, 2] * (r + 1)``, weighted ``[1, 10]`` in the loss; its use of the shared ``[0.5, 0.25]`` is scaled by
    ``r + 1``."""
    r = distributed.rank()
    part = (torch.tensor([1.0, 2.0]) * (r + 1)).requires_grad_()
    total = distributed.sum_over_ranks(part)
    (total * torch.tensor([1.0, 10.0])).sum().backward()
    shared = torch.tensor([0.5, 0.25], requires_grad=True)
    used = distributed.sum_gradient_over_ranks(shared)
    (used * (r + 1)).sum().backward()
    assert part.grad is not None and shared.grad is not None
    result = {"total": total.tolist(), "part_grad": part.grad.tolist(), "used": used.tolist()}
    _write_rank(out, {**result, "shared_grad": shared.grad.tolist()})


DASH_SETTINGS = DashboardSettings(n_top=4, window=3, n_bins=3, per_bin=2, histogram_bins=5, n_logits=4)


def dashboards_config(
    out_dir: str | Path, sae: str | Path, activations_dir: str | Path, corpus: str | Path
) -> DashboardsConfig:
    """Dashboards of the TopK SAE (saved in ``sae``) over the shards in ``activations_dir``, a checkpoint every
    round."""
    return DashboardsConfig(
        sae=str(sae), model="random-llama", activations_dir=str(activations_dir), corpus=str(corpus),
        context_length=16, batch_contexts=3, out_dir=str(out_dir), progress=False, checkpoint_every=1,
        checkpoint_seconds=0, dashboards=DASH_SETTINGS,
    )  # fmt: skip


def _dashboards_hook(out_dir: str, kill: list[int] | None, stop: list[int] | None):
    """The ``on_chunk`` that kills (``os._exit``) or interrupts (SIGINT) rank ``[0]`` after the chunk keyed ``[2]``
    of pass ``[1]``; a kill waits for the checkpoint rank 0 writes after the round before."""
    if kill is not None and distributed.rank() == kill[0]:

        def killed(state: DashboardState) -> None:
            if [state.pass_number, state.key] == kill[1:]:
                deadline = time.monotonic() + 20
                before = [kill[1], kill[2] - 1 - distributed.rank()]
                while time.monotonic() < deadline:
                    meta = read_checkpoint_meta(out_dir)
                    if meta is not None and [meta["pass"], meta["key"]] == before:
                        break
                    time.sleep(0.05)
                os._exit(1)

        return killed
    if stop is not None and distributed.rank() == stop[0]:
        return lambda state: signal.raise_signal(signal.SIGINT) if [state.pass_number, state.key] == stop[1:] else None
    return None


def _dashboards(model: HookedModel, saes: dict[str, SparseAutoencoder], task: dict[str, Any]) -> None:
    config = dashboards_config(**task["config"])
    hook = _dashboards_hook(config.out_dir, task.get("kill"), task.get("stop"))
    try:
        run_dashboards(config, model, saes[HOOKS[0]], on_chunk=hook)
    except Interrupted as stopped:
        _write_rank(config.out_dir, {"where": stopped.where, "checkpoint": str(stopped.checkpoint)})


HARVEST_TOKENS = 600  # 7 shards of 2 forward passes (90 rows), the last one short


def harvest_store(model: HookedModel, activations_dir: str | Path, corpus: str | Path) -> ActivationStore:
    """The store of the harvest tests: both hooks, 3 contexts of 16 tokens (15 kept) per forward pass, shards of
    90 rows."""
    return ActivationStore(model, HOOKS, corpus, context_length=16, batch_contexts=3, activations_dir=activations_dir,
                           shard_tokens=90)  # fmt: skip


def _harvest(model: HookedModel, task: dict[str, Any]) -> None:
    kill = task.get("kill")

    def killed(first_context: int, n_contexts: int) -> None:
        if kill is not None and [distributed.rank(), first_context] == kill:
            os._exit(1)

    store = harvest_store(model, task["activations_dir"], task["corpus"])
    if task.get("slow_plan") == distributed.rank():  # this rank plans 2 s late: the others harvest meanwhile
        plan = store.plan
        store.plan = lambda n_tokens: (time.sleep(2), plan(n_tokens))[1]  # type: ignore[method-assign]
    store.harvest(HARVEST_TOKENS, progress=False, on_batch=killed, checkpoint_seconds=1e-9, data_parallel=True)


@contextmanager
def stage_shards(rows: int | None, record: str | None = None) -> Iterator[None]:
    """Inside the block, the stores the stages build write shards of ``rows`` rows (None: their default, 65536,
    which gives a test-sized harvest one shard, all of it one rank's); with ``record``, the shard files this rank
    harvests are written to ``record.RANK.json`` at the end, so that a test sees which rank harvested what."""
    if rows is None:
        yield
        return
    harvested: list[str] = []
    harvest_shard = ActivationStore._harvest_shard

    def spy(store: ActivationStore, entry: dict[str, Any], *args: Any) -> None:
        harvested.append(entry["file"])
        harvest_shard(store, entry, *args)

    with (
        mock.patch.object(
            ActivationStore, "__init__", functools.partialmethod(ActivationStore.__init__, shard_tokens=rows)
        ),
        mock.patch.object(ActivationStore, "_harvest_shard", spy),
    ):
        yield
    if record is not None:
        _write_rank(record, harvested)


COUNT_SHARD_ROWS = 45  # one forward pass per shard: the count's 161 rows are harvested in 4 shards
STORE_ROWS = 630  # the rows of the corpus (TEXT * 2) in forward passes of 3 contexts of 16 tokens (15 kept)


def store_train_config(out_dir: str | Path, activations_dir: str | Path, corpus: str | Path) -> TrainConfig:
    """The TopK SAE of :func:`train_config` trained on the tiny llama's block 1 over the corpus (10 steps of 63 rows),
    harvested first to ``activations_dir``."""
    return train_config(out_dir, "topk", model="random-llama", hook_name=HOOKS[0], corpus=str(corpus),
                        activations_dir=str(activations_dir), context_length=16, batch_contexts=3,
                        n_tokens=STORE_ROWS, shuffle_buffer=200)  # fmt: skip


class SyntheticRows:
    """A deterministic stream of ``[batch, 16]`` rows, each a sparse non-negative mix of 40 random directions plus
    noise, as ``{"x": rows}`` batches (a :class:`~mechscope.sae.train.BatchSource`); every process gets the same
    rows. With ``signal_at``, the process sends itself SIGINT as it hands out that batch (counted from 1)."""

    def __init__(self, signal_at: int | None = None) -> None:
        self.signal_at = signal_at

    def batches(
        self, batch_size: int, n_tokens: int | None = None, shuffle_buffer: int = 0, seed: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        directions = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
        assert n_tokens is not None
        for index in range(1, n_tokens // batch_size + 1):
            chosen = torch.rand(batch_size, 40, generator=g).topk(3, dim=-1).indices
            scale = torch.zeros(batch_size, 40).scatter_(1, chosen, 0.5 + torch.rand(batch_size, 3, generator=g))
            if index == self.signal_at:
                os.kill(os.getpid(), signal.SIGINT)
            yield {"x": scale @ directions + 0.05 * torch.randn(batch_size, 16, generator=g)}


def train_config(out_dir: str | Path, architecture: str, **overrides: Any) -> TrainConfig:
    """A tiny SAE (16 -> 48 latents) trained for 60 steps of 63 rows (shares of 32 and 31 rows on two ranks),
    with latents dying after 4 steps so that AuxK takes part."""
    settings: dict[str, Any] = {
        "model": "synthetic",
        "hook_name": "x",
        "architecture": architecture,
        "d_sae": 48,
        "k": 4,
        "n_tokens": 63 * 60,
        "batch_size_tokens": 63,
        "lr": 1e-2,
        "warmup_steps": 5,
        "dead_tokens_threshold": 63 * 4,
        "aux_k": 6,
        "l1_coefficient": 0.05,
        "l0_coefficient": 0.05,
        "jumprelu_bandwidth": 0.05,
        "jumprelu_init_threshold": 0.05,
        "checkpoint_every": 0,
        "checkpoint_seconds": 0,
        "log_every": 10,
        "progress": False,
        "out_dir": str(out_dir),
        **overrides,
    }
    return TrainConfig(**settings)


def train_task(task: dict[str, Any]) -> None:
    """Train as ``task`` says; an interrupted run writes ``out.RANK.json`` with what this rank's ``Interrupted``
    said."""
    config = train_config(**task["config"])
    signal_rank, signal_at = task.get("signal", (None, None))
    rows = SyntheticRows(signal_at if signal_rank == distributed.rank() else None)
    try:
        train_sae(config, store=rows, stop_after=task.get("stop_after"))
    except Interrupted as stopped:
        _write_rank(task["out"], {"where": stopped.where, "signum": stopped.signum, "message": str(stopped)})


def main(tasks_file: str) -> None:
    torch.set_num_threads(1)
    tasks = json.loads(Path(tasks_file).read_text())
    if os.environ.get("RANK") == "0":  # before the process group: the other ranks wait for rank 0 to join it
        for task in tasks:
            if task["kind"] == "train_alone":
                train_task(task)
    model, saes = tiny_model(), tiny_saes()
    with distributed.session():
        for task in tasks:
            if task["kind"] == "count":
                config = cooc_config(**task["config"])
                on_batch = _killer(config.results_dir, task.get("kill"), task.get("stop"))
                try:
                    with stage_shards(task.get("shard_tokens"), config.results_dir):
                        run_count(config, model, saes, on_batch=on_batch)
                except Interrupted as stopped:
                    _write_rank(config.results_dir, {"where": stopped.where, "signum": stopped.signum})
            elif task["kind"] == "evaluate":
                _write_rank(task["out"], evaluation(model, saes))
            elif task["kind"] == "collectives":
                _collectives(task["out"])
            elif task["kind"] == "autograd_sums":
                _autograd_sums(task["out"])
            elif task["kind"] == "dashboards":
                _dashboards(model, saes, task)
            elif task["kind"] == "harvest":
                _harvest(model, task)
            elif task["kind"] == "train":
                train_task(task)
            elif task["kind"] == "train_store":
                with stage_shards(task["shard_tokens"], task["config"]["out_dir"]):
                    train_sae(store_train_config(**task["config"]), model)
            elif task["kind"] != "train_alone":
                raise ValueError(f"unknown task {task['kind']!r}")


if __name__ == "__main__":
    main(sys.argv[1])
