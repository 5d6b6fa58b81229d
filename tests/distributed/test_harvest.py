"""A shared harvest under ``torchrun`` (gloo, two ranks) against one process: the same shard files, the same
manifest, the same rows in the same order, shuffled or not; a harvest whose rank 1 is killed in its second shard
resumes, in one process, to the same shards (the ranks' records and pending rows are used, then removed).

The launches are the ``dash_runs`` fixture's (``conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mechscope.data.store import MANIFEST
from tests.distributed.job import HOOKS, harvest_store, tiny_model


def _assert_same_harvest(got: Path, want: Path) -> None:
    manifest = json.loads((want / MANIFEST).read_text())
    assert json.loads((got / MANIFEST).read_text()) == manifest
    assert len(manifest["shards"]) == 7 and sum(s["n_tokens"] for s in manifest["shards"]) == 630
    model = tiny_model()
    stores = [harvest_store(model, d, got.parent / "corpus.txt") for d in (got, want)]
    for a, b in zip(*(s.shard_rows() for s in stores), strict=True):
        assert a.keys() == b.keys() == {*HOOKS, "tokens", "context", "position"}
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    shuffled = [list(s.batches(50, shuffle_buffer=200, seed=3)) for s in stores]
    assert len(shuffled[0]) == len(shuffled[1]) == 13
    for a, b in zip(*shuffled, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in (*HOOKS, "tokens")), "shuffled batches differ"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())  # nothing left over


def test_two_ranks_harvest_the_shards_of_one_process(dash_runs: dict) -> None:
    tmp = dash_runs["tmp"]
    _assert_same_harvest(tmp / "h_two", tmp / "h_one")


def test_a_harvest_killed_in_one_rank_resumes_to_the_same_shards(dash_runs: dict) -> None:
    tmp = dash_runs["tmp"]
    assert dash_runs["status"][1] != 0, "the killed rank should fail the launch"
    left = dash_runs["harvest_left"]
    assert "manifest.rank1.json" in left and "shard_00001.safetensors" in left  # rank 1's first shard, recorded
    assert "pending.shard_00003.safetensors" in left and "shard_00003.safetensors" not in left
    assert [s["file"] for s in dash_runs["harvest_record"]["shards"]] == ["shard_00001.safetensors"]
    _assert_same_harvest(tmp / "h_killed", tmp / "h_one")
