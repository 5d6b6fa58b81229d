"""A shared harvest under ``torchrun`` (gloo, two ranks, rank 1 planning 2 s late, so that rank 0 has finished
shards before rank 1 deals them out) against one process: the same shard files, the same manifest, the same rows
in the same order, shuffled or not; a harvest whose rank 1 is killed in its second shard
resumes, in one process, to the same shards (the ranks' records and pending rows are used, then removed).

The launches are the ``dash_runs`` fixture's (``conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mechscope.data.store import MANIFEST, ActivationStore
from tests.distributed.job import HOOKS, tiny_model


def assert_same_harvest(got: Path, want: Path, hooks: list[str], n_shards: int, n_rows: int) -> None:
    """``got`` holds the shard files and manifest of ``want`` (``n_shards`` shards of ``n_rows`` rows in all at
    ``hooks``, harvested over ``corpus.txt`` next to ``got``), the same rows in the same order, shuffled or not,
    and nothing else."""
    manifest = json.loads((want / MANIFEST).read_text())
    assert json.loads((got / MANIFEST).read_text()) == manifest
    assert len(manifest["shards"]) == n_shards and sum(s["n_tokens"] for s in manifest["shards"]) == n_rows
    model = tiny_model()
    stores = [ActivationStore(model, hooks, got.parent / "corpus.txt", context_length=16, batch_contexts=3,
                              activations_dir=d) for d in (got, want)]  # fmt: skip
    for a, b in zip(*(s.shard_rows() for s in stores), strict=True):
        assert a.keys() == b.keys() == {*hooks, "tokens", "context", "position"}
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    shuffled = [list(s.batches(50, shuffle_buffer=200, seed=3)) for s in stores]
    assert len(shuffled[0]) == len(shuffled[1]) == -(-n_rows // 50)
    for a, b in zip(*shuffled, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in (*hooks, "tokens")), "shuffled batches differ"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())  # nothing left over


def test_two_ranks_harvest_the_shards_of_one_process(dash_runs: dict) -> None:
    tmp = dash_runs["tmp"]
    assert_same_harvest(tmp / "h_two", tmp / "h_one", HOOKS, 7, 630)


def test_a_harvest_killed_in_one_rank_resumes_to_the_same_shards(dash_runs: dict) -> None:
    tmp = dash_runs["tmp"]
    assert dash_runs["status"][1] != 0, "the killed rank should fail the launch"
    left = dash_runs["harvest_left"]
    assert "manifest.rank1.json" in left and "shard_00001.safetensors" in left  # rank 1's first shard, recorded
    assert "pending.shard_00003.safetensors" in left and "shard_00003.safetensors" not in left
    assert [s["file"] for s in dash_runs["harvest_record"]["shards"]] == ["shard_00001.safetensors"]
    assert_same_harvest(tmp / "h_killed", tmp / "h_one", HOOKS, 7, 630)
