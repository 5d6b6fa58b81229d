"""Co-occurrence counting under ``torchrun`` on CPU (gloo) against one process: two ranks on one node, counting
live and from harvested shards; two "nodes" on localhost (c10d rendezvous); and a rank killed mid-count, resumed
with two ranks and with one. Every count must equal the single-process count entry for entry.

The launches are the ``runs`` fixture's (``conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mechscope.cooccurrence import load_counts
from tests.distributed import harness
from tests.distributed.job import HOOKS

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
