"""The single-process pieces the shared stages build on: a rank's share of the stored shards
(``chunks(start, step=...)``), the harvest plan (the shards one process writes, from the tokens alone), and a
dashboards state whose pass is restarted after rank 0 took it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechscope.dashboards.build import DashboardState, chunk_list, run_pass
from mechscope.data.store import MANIFEST
from tests.dashboards.test_build import D_SAE, HOOK, stored_rows
from tests.dashboards.test_resume import SETTINGS, small_sae
from tests.distributed.job import HARVEST_TOKENS, TEXT, harvest_store, tiny_model


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A one-process harvest of seven shards, and the plan made before it."""
    tmp = tmp_path_factory.mktemp("shares")
    (tmp / "corpus.txt").write_text(TEXT * 2)
    store = harvest_store(tiny_model(), tmp / "acts", tmp / "corpus.txt")
    plan = store.plan(HARVEST_TOKENS)
    store.harvest(HARVEST_TOKENS, progress=False)
    return tmp, plan


def test_the_plan_is_the_manifest_one_process_writes(harvested) -> None:
    tmp, plan = harvested
    shards = json.loads((tmp / "acts" / MANIFEST).read_text())["shards"]
    assert plan == shards and len(shards) == 7
    assert [s["n_tokens"] for s in shards] == [90] * 7  # 14 passes of 45 kept rows, two per shard
    assert harvest_store(tiny_model(), tmp / "acts", tmp / "corpus.txt").plan(HARVEST_TOKENS) == []  # all stored
    more = harvest_store(tiny_model(), tmp / "acts", tmp / "corpus.txt").plan(HARVEST_TOKENS + 100)
    assert more[0]["file"] == "shard_00007.safetensors" and more[0]["first_context"] == 42


def test_a_rank_reads_every_world_th_shard_with_its_key(harvested) -> None:
    tmp, _ = harvested
    store = harvest_store(tiny_model(), tmp / "acts", tmp / "corpus.txt")
    shards = list(store.shard_rows())
    for start, step in [(0, 2), (1, 2), (3, 3), (9, 2)]:
        got = list(store.chunks(start, step=step))
        assert [key for key, _ in got] == [i + 1 for i in range(start, 7, step)]
        for (_, rows), i in zip(got, range(start, 7, step), strict=True):
            assert torch.equal(rows["context"], shards[i]["context"])
    in_memory = chunk_list(shards)
    assert [key for key, _ in in_memory(1, step=3)] == [2, 5]
    live = harvest_store(tiny_model(), None, tmp / "corpus.txt")
    with pytest.raises(ValueError, match=r"chunks\(step=2\) reads every 2-th stored shard: harvest"):
        next(live.chunks(0, step=2))


@pytest.mark.parametrize("pass_number", [1, 2, 3])
def test_restart_pass_empties_the_pass_and_keeps_the_ones_before(pass_number: int) -> None:
    sae, (_, chunks) = small_sae(1), stored_rows(1)
    state = DashboardState.start(D_SAE, SETTINGS)
    for _ in range(pass_number - 1):
        state = run_pass(state, sae, HOOK, chunk_list(chunks), progress=False).next_pass()
    start = {k: v.clone() for k, v in state.tensors().items()}
    state = run_pass(state, sae, HOOK, chunk_list(chunks[:2]), progress=False)
    restarted = state.restart_pass()
    assert restarted.key == state.key == 2 and restarted.pass_number == pass_number
    got = restarted.tensors()
    assert got.keys() == start.keys()
    for name, value in start.items():
        assert torch.equal(got[name], value), name  # this pass as at its start, the passes before unchanged
    rest = run_pass(restarted, sae, HOOK, chunk_list(chunks), progress=False)  # chunks 2.. on the restarted state
    whole = DashboardState.from_tensors(SETTINGS, pass_number, 0, {k: v.clone() for k, v in start.items()})
    whole = run_pass(whole, sae, HOOK, chunk_list(chunks), progress=False)
    merged = state.merge(rest).tensors()  # rank 0's first two chunks with the rest: the whole pass
    for name, value in whole.tensors().items():
        assert torch.equal(merged[name], value), name
