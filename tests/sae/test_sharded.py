"""The single-process pieces of latent-sharded training (:mod:`mechscope.sae.sharded`): the ranks' contiguous
blocks of latents, the local indices of a selection (distinct stand-ins for the other ranks' latents), cutting and
putting together the SAE's tensors, and a ``shard_latents`` run in one process (one block: the whole SAE), which
equals the plain run. Two ranks: ``tests/distributed/test_sharded.py``."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from mechscope import distributed
from mechscope.sae import SAEConfig, SparseAutoencoder
from mechscope.sae.sharded import LatentShard
from mechscope.sae.train import train_sae
from tests.distributed.job import SyntheticRows, train_config


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 47, 48])
def test_the_blocks_are_contiguous_in_rank_order_and_cover_the_items(n: int, world: int) -> None:
    blocks = [distributed.block(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1
    assert [len(b) for b in blocks] == sorted((len(b) for b in blocks), reverse=True)  # the larger ones first


def test_a_selection_becomes_this_ranks_local_indices_with_distinct_stand_ins() -> None:
    shard = LatentShard(SAEConfig(d_in=4, d_sae=20, architecture="topk", k=4))
    shard.latents = range(8, 13)  # as rank 1 of 4 holds them
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(200)])
    indices[0] = torch.tensor([8, 9, 10, 11])  # every latent this rank's
    indices[1] = torch.tensor([0, 19, 2, 3])  # none
    local, owned = shard.own(indices)
    for row, local_row, owned_row in zip(indices.tolist(), local.tolist(), owned.tolist(), strict=True):
        assert owned_row == [8 <= i < 13 for i in row]
        assert [j for j, mine in zip(local_row, owned_row, strict=True) if mine] == [i - 8 for i in row if 8 <= i < 13]
        assert len(set(local_row)) == 4 and all(0 <= j < 5 for j in local_row)


def test_blocks_too_small_for_the_selection_are_refused_naming_the_fix() -> None:
    cfg = SAEConfig(d_in=4, d_sae=9, architecture="topk", k=4)
    with mock.patch.object(distributed, "world_size", return_value=2):  # blocks of 5 and 4 latents
        shard = LatentShard(cfg)
        shard.check_room(aux_k=4)
        message = r"max\(k, aux_k\) = 5 latents on every rank, but d_sae=9 over 2 ranks leaves 4: run fewer processes"
        with pytest.raises(ValueError, match=message):
            shard.check_room(aux_k=5)
    with (
        mock.patch.object(distributed, "world_size", return_value=10),
        pytest.raises(ValueError, match="fewer than one"),
    ):
        LatentShard(cfg)
    with pytest.raises(ValueError, match="for topk SAEs, not 'relu'"):
        LatentShard(SAEConfig(d_in=4, d_sae=9))


def test_taking_every_block_and_putting_them_together_gives_the_whole_tensors() -> None:
    cfg = SAEConfig(d_in=6, d_sae=11, architecture="topk", k=2)
    whole = SparseAutoencoder(cfg).state_dict()
    whole["b_enc"] = torch.randn(11)
    shard = LatentShard(cfg)
    blocks = []
    for r in range(3):
        shard.latents = distributed.block(11, r, 3)
        blocks.append(shard.take(whole))
    assert [b["W_dec"].shape[0] for b in blocks] == [4, 4, 3] and blocks[2]["W_enc"].shape == (6, 3)
    for name, axis in [("W_enc", 1), ("W_dec", 0), ("b_enc", 0)]:
        assert torch.equal(torch.cat([b[name] for b in blocks], dim=axis), whole[name])
    assert all(torch.equal(b["b_dec"], whole["b_dec"]) for b in blocks)
    shard.latents = distributed.block(11)  # one process: its block is the whole SAE
    gathered = shard.gather(whole)
    assert gathered is not None and all(torch.equal(gathered[name], whole[name]) for name in whole)


def test_a_sharded_run_in_one_process_trains_the_plain_runs_sae(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    plain = train_sae(train_config(tmp_path / "plain", "topk", d_sae=47), store=SyntheticRows()).state_dict()
    sharded = train_sae(train_config(tmp_path / "sharded", "topk", d_sae=47, shard_latents=True), store=SyntheticRows())
    assert sharded.cfg.d_sae == 47
    assert max(float((sharded.state_dict()[name] - plain[name]).abs().max()) for name in plain) < 1e-5
