"""Latent-sharded TopK training under ``torchrun`` on CPU (gloo) against one process training the whole SAE: two
ranks holding 24 + 23 of 47 latents (AuxK on), and 5 + 4 of 9 latents (as few as k = 4 on rank 1; aux_k = 4 too,
though no latent dies there), train over 60 steps of 63 rows the SAE one process trains; a run one process started is
finished by two sharded ranks, and a run two sharded ranks started is finished by one process, both equal to the
uninterrupted run (checkpoints hold the whole SAE). The two autograd sums of :mod:`mechscope.distributed` give,
forward and backward, what they promise.

One launch runs every two-rank task; the single-process runs go meanwhile."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.sae import SparseAutoencoder
from mechscope.sae.train import CHECKPOINT_DIR, SAE_DIR, TRAINER_JSON, train_sae
from tests.distributed import harness
from tests.distributed.job import SyntheticRows, train_config
from tests.distributed.test_train import TOLERANCE, _max_difference, assert_same_run

WIDTHS = [47, 9]
AUX_K = {47: 6, 9: 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dist_sharded")

    def sharded(name: str, d_sae: int = 47) -> dict:
        return {"out_dir": str(tmp / name), "architecture": "topk", "d_sae": d_sae, "aux_k": AUX_K[d_sae],
                "shard_latents": True}  # fmt: skip

    one_then_two = {"out_dir": str(tmp / "one_then_two"), "architecture": "topk", "d_sae": 47}
    tasks = [{"kind": "train", "config": sharded(f"sharded_{d}", d)} for d in WIDTHS]
    tasks += [
        {"kind": "autograd_sums", "out": str(tmp / "autograd_sums")},
        {"kind": "train", "config": sharded("two_then_one"), "stop_after": 30},
        {"kind": "train_alone", "config": one_then_two, "stop_after": 25},
        {"kind": "train", "config": {**one_then_two, "shard_latents": True, "resume": True}},
    ]
    launch = harness.torchrun(["--standalone", "--nproc-per-node=2"], tasks, tmp, "sharded")
    torch.set_num_threads(1)
    for d_sae in WIDTHS:
        train_sae(train_config(tmp / f"one_{d_sae}", "topk", d_sae=d_sae, aux_k=AUX_K[d_sae]), store=SyntheticRows())
    status = harness.wait(launch, tmp, "sharded")
    checkpoint = json.loads((tmp / "two_then_one" / CHECKPOINT_DIR / TRAINER_JSON).read_text())
    train_sae(train_config(tmp / "two_then_one", "topk", d_sae=47, resume=True), store=SyntheticRows())
    return {"tmp": tmp, "status": status, "checkpoint": checkpoint}


def test_the_autograd_sums_of_two_ranks(runs: dict) -> None:
    """sum_over_ranks: the sum forward, the gradient unchanged backward; sum_gradient_over_ranks: the tensor forward,
    the sum of the ranks' gradients backward."""
    assert runs["status"] == 0, harness.log(runs["tmp"], "sharded")
    for r in (0, 1):
        got = json.loads((runs["tmp"] / f"autograd_sums.{r}.json").read_text())
        assert got == {"total": [3.0, 6.0], "part_grad": [1.0, 10.0], "used": [0.5, 0.25], "shared_grad": [3.0, 3.0]}


@pytest.mark.parametrize("d_sae", WIDTHS)
def test_two_sharded_ranks_train_the_sae_one_process_trains(runs: dict, d_sae: int) -> None:
    assert runs["status"] == 0, harness.log(runs["tmp"], "sharded")
    expected = assert_same_run(runs["tmp"] / f"one_{d_sae}", runs["tmp"] / f"sharded_{d_sae}", f"d_sae {d_sae}")
    if d_sae == 47:
        assert any("aux" in m for m in expected), "no dead latents: AuxK untested"


def test_a_run_changes_between_one_process_and_sharded_ranks_at_a_checkpoint(runs: dict) -> None:
    assert runs["status"] == 0, harness.log(runs["tmp"], "sharded")
    tmp = runs["tmp"]
    assert runs["checkpoint"]["step"] == 30
    assert [p["row_step"] for p in runs["checkpoint"]["ranks"]] == [1, 1]  # each sharded rank read every row
    assert _max_difference(tmp / "one_47", tmp / "two_then_one") < TOLERANCE  # two sharded ranks, then one process
    assert _max_difference(tmp / "one_47", tmp / "one_then_two") < TOLERANCE  # one process, then two sharded ranks


def test_the_saved_sae_is_the_whole_sae(runs: dict) -> None:
    assert runs["status"] == 0, harness.log(runs["tmp"], "sharded")
    saved = SparseAutoencoder.load(runs["tmp"] / "sharded_9" / SAE_DIR).cfg
    assert (saved.d_sae, saved.k, saved.architecture, saved.d_in) == (9, 4, "topk", 16)
