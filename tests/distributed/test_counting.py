"""Co-occurrence counting under ``torchrun`` on CPU (gloo) against one process: two ranks on one node, counting
live and from shards they harvest together (those of one process); two "nodes" on localhost (c10d rendezvous); a
rank killed mid-count, resumed with two ranks and with one; and a SIGINT to one rank. Every count must equal the
single-process count entry for entry.

The launches are the ``runs`` fixture's (``conftest.py``)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np

from mechscope.cooccurrence import load_counts
from mechscope.cooccurrence.outputs import read_checkpoint_state
from mechscope.cooccurrence.pipeline import CHECKPOINT, run_count
from tests.distributed import harness
from tests.distributed.job import HOOKS, cooc_config, tiny_model, tiny_saes
from tests.distributed.test_harvest import assert_same_harvest

THRESHOLDS = [0.0, 0.3]


def _assert_equal_counts(expected: dict, directory: Path) -> None:
    for hook in HOOKS:
        for t in THRESHOLDS:
            got, want = load_counts(directory / hook, t), expected[hook][t]
            assert got.n_tokens == want.n_tokens > 0
            assert got.counts.dtype == np.int64
            np.testing.assert_array_equal(got.counts.toarray(), want.counts.toarray())


def test_two_ranks_count_what_one_counts(runs: dict) -> None:
    assert runs["status_two"] != 0, "the killed rank should fail the launch"
    _assert_equal_counts(runs["one"], runs["tmp"] / "two")
    _assert_equal_counts(runs["one"], runs["tmp"] / "two_store")


def test_two_ranks_share_the_count_harvest_of_one_process(runs: dict) -> None:
    """The count from an empty ``activations_dir``: each rank harvested every other of the 4 shards, which equal
    the shards one process harvests, and so do the counts."""
    tmp = runs["tmp"]
    harvested = [json.loads((tmp / f"two_store.{r}.json").read_text()) for r in (0, 1)]
    assert harvested == [[f"shard_{i:05d}.safetensors" for i in range(r, 4, 2)] for r in (0, 1)]
    assert_same_harvest(tmp / "acts", tmp / "acts_one", HOOKS, 4, 180)  # 4 passes of 45 rows, 161 counted
    _assert_equal_counts(runs["one_store"], tmp / "two_store")


def test_two_nodes_count_what_one_counts(runs: dict) -> None:
    assert runs["status_nodes"] == [0, 0], [harness.log(runs["tmp"], f"node{n}") for n in (0, 1)]
    _assert_equal_counts(runs["one"], runs["tmp"] / "nodes")


def test_a_killed_rank_resumes_without_counting_a_batch_twice(runs: dict) -> None:
    state = runs["killed_state"]
    assert state["batches_done"] == 2 and state["saved_n_batches"] is None  # killed after the first checkpoint
    _assert_equal_counts(runs["one"], runs["tmp"] / "killed")  # resumed by two ranks
    _assert_equal_counts(runs["one"], runs["tmp"] / "killed_one")  # resumed by one process
    for hook in HOOKS:
        for t in THRESHOLDS:
            np.testing.assert_array_equal(runs["resumed_one"][hook][t].counts.toarray(),
                                          runs["one"][hook][t].counts.toarray())  # fmt: skip


def test_the_collectives_of_two_ranks(runs: dict) -> None:
    tmp = runs["tmp"]
    results = [json.loads((tmp / f"collectives.{r}.json").read_text()) for r in (0, 1)]
    for r, result in enumerate(results):
        assert (result["rank"], result["world"]) == (r, 2)
        assert result["share"] == list(range(r, 7, 2))
        assert result["sum"] == [2 * 2**40 + 3 * i for i in range(4)]  # (1 + 2) * i + 2 * 2**40
        assert result["gathered"] == [[[0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]
        assert result["broadcast"] == {"from": 0}
    assert results[0]["to_main"] == [0, 1] and results[1]["to_main"] is None
    assert results[0]["tensors_to_main"] == [[[], [0]], [[2**40, 2**40 + 1, 2**40 + 2], [1, 1]]]
    assert results[1]["tensors_to_main"] is None


def test_a_sigint_to_one_rank_stops_both_at_the_same_batch(runs: dict) -> None:
    """Rank 1 alone gets SIGINT after batch 3: both ranks checkpoint batch 3 and raise ``Interrupted`` there (rank 0
    with rank 1's signal), and one process finishes the count equal to the uninterrupted one."""
    tmp = runs["tmp"]
    stopped = [json.loads((tmp / f"stopped.{r}.json").read_text()) for r in (0, 1)]
    assert stopped == [{"where": "batch 3 of 7", "signum": int(signal.SIGINT)}] * 2
    assert read_checkpoint_state(tmp / "stopped" / CHECKPOINT)["batches_done"] == 3
    run_count(cooc_config(tmp / "stopped", tmp / "corpus.txt"), tiny_model(), tiny_saes())
    _assert_equal_counts(runs["one"], tmp / "stopped")
