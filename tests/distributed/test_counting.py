"""Co-occurrence counting under ``torchrun`` on CPU (gloo) against one process: two ranks on one node, counting
live and from harvested shards; two "nodes" on localhost (c10d rendezvous); and a rank killed mid-count, resumed
with two ranks and with one. Every count must equal the single-process count entry for entry.

Each launch runs several tasks of :mod:`tests.distributed.job` (a launch costs seconds of imports)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mechscope.cooccurrence import load_counts
from mechscope.cooccurrence.outputs import read_checkpoint_state
from mechscope.cooccurrence.pipeline import CHECKPOINT, run_count
from tests.distributed import harness
from tests.distributed.job import HOOKS, TEXT, cooc_config, tiny_model, tiny_saes

THRESHOLDS = [0.0, 0.3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every launch, and the single-process count computed meanwhile; returns the paths and exit statuses."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 2)

    def count(name: str, kill: list[int] | None = None, **extra) -> dict:
        config = {"results_dir": str(tmp / name), "corpus": str(corpus), **extra}
        return {"kind": "count", "config": config, "kill": kill}

    two = [count("two"), count("two_store", activations_dir=str(tmp / "acts")), count("killed", kill=[1, 4])]
    launch_two = harness.torchrun(["--standalone", "--nproc-per-node=2"], two, tmp, "two")
    one = run_count(cooc_config(tmp / "one", corpus), tiny_model(), tiny_saes())
    status_two = harness.wait(launch_two, tmp, "two")
    killed_state = read_checkpoint_state(tmp / "killed" / CHECKPOINT)
    shutil.copytree(tmp / "killed", tmp / "killed_one")

    port = harness.free_port()
    nodes = [count("nodes"), count("killed"), {"kind": "collectives", "out": str(tmp / "collectives")}]
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    launches = [harness.torchrun([*rdzv, f"--node-rank={n}"], nodes, tmp, f"node{n}") for n in (0, 1)]
    resumed_one = run_count(cooc_config(tmp / "killed_one", corpus), tiny_model(), tiny_saes())
    status_nodes = [harness.wait(p, tmp, f"node{n}") for n, p in enumerate(launches)]
    return {
        "tmp": tmp,
        "one": one,
        "resumed_one": resumed_one,
        "status_two": status_two,
        "status_nodes": status_nodes,
        "killed_state": killed_state,
    }


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
