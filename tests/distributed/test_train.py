"""SAE training under ``torchrun`` on CPU (gloo) against one process: two ranks sharing each batch of 63 rows
(32 + 31) train, over 60 steps, the SAE one process trains, for TopK, BatchTopK, ReLU and JumpReLU; runs one process
or two ranks started are resumed by two ranks, and a run two ranks started is stopped by SIGINT to one rank (both
stop after the same step, rank 0 checkpoints) and resumed by one process; each equals the uninterrupted run. Two
ranks harvest the tiny llama's activations together and train on them the SAE one process trains.

One launch runs every two-rank task (a launch costs seconds of imports); the single-process runs go meanwhile."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from mechscope.files import read_safetensors
from mechscope.sae import SparseAutoencoder
from mechscope.sae.train import CHECKPOINT_DIR, METRICS_FILE, SAE_DIR, TRAINER_JSON, TRAINER_TENSORS, train_sae
from tests.distributed import harness
from tests.distributed.job import (
    HOOKS,
    STORE_ROWS,
    TEXT,
    SyntheticRows,
    stage_shards,
    store_train_config,
    tiny_model,
    train_config,
)
from tests.distributed.test_harvest import assert_same_harvest

ARCHITECTURES = ["topk", "batchtopk", "relu", "jumprelu"]
SIGNAL_AT = 23  # rank 1 sends itself SIGINT as it reads batch 23: both ranks stop after step 23
SHARD_ROWS = 90  # the harvest before training: 7 shards of 2 forward passes
TOLERANCE = 1e-5  # float32 sums in another order, over 60 Adam steps: measured 1e-7 to 2e-7


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dist_train")
    tasks: list[dict] = [{"kind": "train", "config": {"out_dir": str(tmp / f"{a}_two"), "architecture": a}}
                         for a in ARCHITECTURES]  # fmt: skip
    one_then_two = {"out_dir": str(tmp / "one_then_two"), "architecture": "batchtopk"}
    two_then_two = {"out_dir": str(tmp / "two_then_two"), "architecture": "jumprelu"}
    tasks += [
        {"kind": "train", "config": two_then_two, "stop_after": 30},
        {"kind": "train", "config": {**two_then_two, "resume": True}},
        {"kind": "train_alone", "config": one_then_two, "stop_after": 25},
        {"kind": "train", "config": {**one_then_two, "resume": True}},
        {"kind": "train", "config": {"out_dir": str(tmp / "stopped"), "architecture": "topk"},
         "signal": [1, SIGNAL_AT], "out": str(tmp / "stopped")},
    ]  # fmt: skip
    (tmp / "corpus.txt").write_text(TEXT * 2)
    store = {
        "out_dir": str(tmp / "store_two"),
        "activations_dir": str(tmp / "acts_two"),
        "corpus": str(tmp / "corpus.txt"),
    }
    tasks.append({"kind": "train_store", "config": store, "shard_tokens": SHARD_ROWS})
    launch = harness.torchrun(["--standalone", "--nproc-per-node=2"], tasks, tmp, "train")
    torch.set_num_threads(1)
    for architecture in ARCHITECTURES:
        train_sae(train_config(tmp / f"{architecture}_one", architecture), store=SyntheticRows())
    with stage_shards(SHARD_ROWS):  # an empty activations_dir, harvested by one process
        train_sae(store_train_config(tmp / "store_one", tmp / "acts_one", tmp / "corpus.txt"), tiny_model())
    status = harness.wait(launch, tmp, "train")
    stopped_checkpoint = json.loads((tmp / "stopped" / CHECKPOINT_DIR / TRAINER_JSON).read_text())
    train_sae(train_config(tmp / "stopped", "topk", resume=True), store=SyntheticRows())
    return {"tmp": tmp, "status": status, "stopped_checkpoint": stopped_checkpoint}


def _max_difference(one: Path, other: Path) -> float:
    """The largest difference between the weights of the SAEs trained in ``one`` and ``other``, after checking that
    their dead-latent counters are equal."""
    counters = [read_safetensors(d / CHECKPOINT_DIR / TRAINER_TENSORS)["tokens_since_fired"] for d in (one, other)]
    assert torch.equal(*counters)
    saes = [SparseAutoencoder.load(d / SAE_DIR).state_dict() for d in (one, other)]
    assert saes[0].keys() == saes[1].keys()
    return max(float((saes[0][name] - saes[1][name]).abs().max()) for name in saes[0])


def assert_same_run(one: Path, two: Path, label: str) -> list[dict]:
    """Check that the runs in ``one`` and ``two`` trained the same SAE (to ``TOLERANCE``) with the same metrics every
    10 steps; return ``one``'s metrics."""
    difference = _max_difference(one, two)  # the whole SAEs, as saved; the dead-latent counters equal
    print(f"{label}: largest weight difference {difference:.2e}")
    assert difference < TOLERANCE
    expected, got = _metrics(one), _metrics(two)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == list(range(10, 61, 10))
    for want, have in zip(expected, got, strict=True):
        assert have.keys() == want.keys()
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-3, abs=1e-6), (key, want["step"])
    return expected


def _metrics(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / METRICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_two_ranks_train_the_sae_one_process_trains(runs: dict, architecture: str) -> None:
    assert runs["status"] == 0, harness.log(runs["tmp"], "train")
    expected = assert_same_run(runs["tmp"] / f"{architecture}_one", runs["tmp"] / f"{architecture}_two", architecture)
    if architecture in ("topk", "batchtopk"):
        assert any("aux" in m for m in expected), "no dead latents: AuxK untested"


def test_two_ranks_share_the_harvest_and_train_the_sae_one_process_trains(runs: dict) -> None:
    """Training from an empty ``activations_dir``: each rank harvested every other of the 7 shards, which equal
    the shards one process harvests, and the SAE trained on them equals one process's."""
    assert runs["status"] == 0, harness.log(runs["tmp"], "train")
    tmp = runs["tmp"]
    harvested = [json.loads((tmp / f"store_two.{r}.json").read_text()) for r in (0, 1)]
    assert harvested == [[f"shard_{i:05d}.safetensors" for i in range(r, 7, 2)] for r in (0, 1)]
    assert_same_harvest(tmp / "acts_two", tmp / "acts_one", HOOKS[:1], 7, STORE_ROWS)
    assert [m["step"] for m in _metrics(tmp / "store_one")] == [10]
    assert _max_difference(tmp / "store_one", tmp / "store_two") < TOLERANCE


def test_a_run_resumed_by_two_ranks_equals_the_uninterrupted_run(runs: dict) -> None:
    assert runs["status"] == 0, harness.log(runs["tmp"], "train")
    assert _max_difference(runs["tmp"] / "batchtopk_one", runs["tmp"] / "one_then_two") < TOLERANCE  # started by 1
    assert _max_difference(runs["tmp"] / "jumprelu_one", runs["tmp"] / "two_then_two") < TOLERANCE  # started by 2


def test_sigint_to_one_rank_stops_both_after_the_same_step_and_one_process_resumes(runs: dict) -> None:
    tmp = runs["tmp"]
    stopped = [json.loads((tmp / f"stopped.{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):
        assert stopped[r]["where"] == f"step {SIGNAL_AT} of 60"
        assert stopped[r]["signum"] == signal.SIGINT
        assert "resume=True" in stopped[r]["message"]
    checkpoint = runs["stopped_checkpoint"]
    assert checkpoint["step"] == SIGNAL_AT
    assert checkpoint["ranks"] == [
        {"rank": r, "batches_done": SIGNAL_AT, "first_row": r, "row_step": 2} for r in (0, 1)
    ]
    assert _max_difference(tmp / "topk_one", tmp / "stopped") < TOLERANCE
