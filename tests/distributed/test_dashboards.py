"""Dashboards under ``torchrun`` on CPU (gloo) against one process: two ranks each read every other stored shard and
merge exactly, so the dashboards equal one process's bit for bit; a SIGINT to one rank stops both at the same chunk
with a checkpoint, and a rerun finishes equal; a rank killed mid-pass is resumed by two ranks and by one, equal again.

The launches are the ``dash_runs`` fixture's (``conftest.py``)."""

from __future__ import annotations

import json

from mechscope.dashboards.outputs import CHECKPOINT, load_dashboards
from tests.dashboards.test_resume import assert_identical


def test_two_ranks_build_the_dashboards_of_one_process(dash_runs: dict) -> None:
    one = dash_runs["one"]
    assert dash_runs["n_shards"] == 7 and one.n_tokens == 630  # 14 forward passes of 3 contexts of 15 kept tokens
    assert int((one.firing > 0).sum()) > 10 and bool((one.top.tokens != -1).any())  # not an empty comparison
    assert_identical(load_dashboards(dash_runs["tmp"] / "two"), one)


def test_a_sigint_to_one_rank_stops_both_at_the_same_chunk_and_a_rerun_finishes(dash_runs: dict) -> None:
    tmp = dash_runs["tmp"]
    stopped = [json.loads((tmp / f"stopped.{r}.json").read_text()) for r in (0, 1)]
    assert [s["where"] for s in stopped] == ["pass 1 of 3, chunk 4"] * 2  # rank 1 read chunk 4, rank 0 chunk 3
    assert stopped[0]["checkpoint"] == str(tmp / "stopped" / CHECKPOINT)
    assert_identical(load_dashboards(tmp / "stopped"), dash_runs["one"])


def test_a_killed_rank_resumes_under_two_ranks_and_under_one(dash_runs: dict) -> None:
    tmp = dash_runs["tmp"]
    assert dash_runs["status"][0] != 0, "the killed rank should fail the launch"
    assert (dash_runs["killed_at"]["pass"], dash_runs["killed_at"]["key"]) == (2, 2)  # the round before the kill
    assert_identical(load_dashboards(tmp / "killed"), dash_runs["one"])  # resumed by two ranks
    assert_identical(dash_runs["resumed_one"], dash_runs["one"])  # resumed by one process
    assert not (tmp / "killed" / CHECKPOINT).exists()
