"""The torchrun launches the distributed tests check, run once per session: each launch runs several tasks of
:mod:`tests.distributed.job` (a launch costs seconds of imports), and the single-process side runs meanwhile."""

from __future__ import annotations

import shutil

import pytest

from mechscope.cooccurrence.outputs import read_checkpoint_state
from mechscope.cooccurrence.pipeline import CHECKPOINT, run_count
from tests.distributed import harness
from tests.distributed.job import TEXT, cooc_config, tiny_model, tiny_saes


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every launch, and the single-process count computed meanwhile; returns the paths and exit statuses."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 2)

    def count(name: str, kill: list[int] | None = None, **extra) -> dict:
        config = {"results_dir": str(tmp / name), "corpus": str(corpus), **extra}
        return {"kind": "count", "config": config, "kill": kill}

    two = [count("two"), count("two_store", activations_dir=str(tmp / "acts"))]
    two += [{"kind": "evaluate", "out": str(tmp / "evaluate")}, count("killed", kill=[1, 4])]
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
