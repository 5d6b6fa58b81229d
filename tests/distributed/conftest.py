"""The torchrun launches the distributed tests check, run once per session: each launch runs several tasks of
:mod:`tests.distributed.job` (a launch costs seconds of imports), and the single-process side runs meanwhile."""

from __future__ import annotations

import json
import shutil

import pytest

from mechscope.cooccurrence.outputs import read_checkpoint_state
from mechscope.cooccurrence.pipeline import CHECKPOINT, run_count
from mechscope.dashboards.outputs import read_checkpoint_meta
from mechscope.dashboards.pipeline import run_dashboards
from mechscope.data.store import ActivationStore
from tests.distributed import harness
from tests.distributed.job import (
    COUNT_SHARD_ROWS,
    HARVEST_TOKENS,
    HOOKS,
    TEXT,
    cooc_config,
    dashboards_config,
    harvest_store,
    stage_shards,
    tiny_model,
    tiny_saes,
)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every launch, and the single-process count computed meanwhile; returns the paths and exit statuses."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 2)

    def count(name: str, kill: list[int] | None = None, stop: list[int] | None = None, **extra) -> dict:
        config = {"results_dir": str(tmp / name), "corpus": str(corpus), **extra}
        return {"kind": "count", "config": config, "kill": kill, "stop": stop}

    store = {**count("two_store", activations_dir=str(tmp / "acts")), "shard_tokens": COUNT_SHARD_ROWS}
    two = [count("two"), store, count("stopped", stop=[1, 3])]
    two += [{"kind": "evaluate", "out": str(tmp / "evaluate")}, count("killed", kill=[1, 4])]
    launch_two = harness.torchrun(["--standalone", "--nproc-per-node=2"], two, tmp, "two")
    one = run_count(cooc_config(tmp / "one", corpus), tiny_model(), tiny_saes())
    with stage_shards(COUNT_SHARD_ROWS):  # an empty activations_dir, harvested by one process
        one_store = run_count(cooc_config(tmp / "one_store", corpus, activations_dir=str(tmp / "acts_one")),
                              tiny_model(), tiny_saes())  # fmt: skip
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
        "one_store": one_store,
        "resumed_one": resumed_one,
        "status_two": status_two,
        "status_nodes": status_nodes,
        "killed_state": killed_state,
    }


@pytest.fixture(scope="session")
def dash_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two launches of two ranks, and the single-process runs meanwhile. Dashboards over seven stored shards:
    plainly; stopped by a SIGINT to rank 1 and resumed; killed in rank 1 and resumed by two ranks (the second
    launch) and by one process. A shared harvest: whole (first launch), and killed in rank 1 (second launch) and
    resumed by one process."""
    tmp = tmp_path_factory.mktemp("dash")
    paths = {"sae": tmp / "sae", "activations_dir": tmp / "acts", "corpus": tmp / "corpus.txt"}
    paths["corpus"].write_text(TEXT * 2)
    model, sae = tiny_model(), tiny_saes()[HOOKS[0]]
    sae.save(paths["sae"])
    store = ActivationStore(model, HOOKS[0], paths["corpus"], context_length=16, batch_contexts=3,
                            activations_dir=paths["activations_dir"], shard_tokens=90)  # fmt: skip
    store.harvest(600, progress=False)

    def dash(name: str, **extra) -> dict:
        config = {"out_dir": str(tmp / name), **{k: str(v) for k, v in paths.items()}}
        return {"kind": "dashboards", "config": config, **extra}

    def harvest(name: str, **extra) -> dict:
        return {"kind": "harvest", "activations_dir": str(tmp / name), "corpus": str(paths["corpus"]), **extra}

    tasks = [harvest("h_two", slow_plan=1), dash("two"), dash("stopped", stop=[1, 1, 4]), dash("stopped"),
             dash("killed", kill=[1, 2, 4])]  # fmt: skip
    launch = harness.torchrun(["--standalone", "--nproc-per-node=2"], tasks, tmp, "dash")
    one = run_dashboards(dashboards_config(tmp / "one", **paths), model, sae)
    harvest_store(model, tmp / "h_one", paths["corpus"]).harvest(HARVEST_TOKENS, progress=False)
    status = harness.wait(launch, tmp, "dash")
    killed_at = read_checkpoint_meta(tmp / "killed")
    shutil.copytree(tmp / "killed", tmp / "killed_one")
    tasks = [dash("killed"), harvest("h_killed", kill=[1, 21])]  # rank 1 dies in its second shard (contexts 18-23)
    launch = harness.torchrun(["--standalone", "--nproc-per-node=2"], tasks, tmp, "dash_resume")
    resumed_one = run_dashboards(dashboards_config(tmp / "killed_one", **paths), model, sae)
    status_resume = harness.wait(launch, tmp, "dash_resume")
    left = sorted(p.name for p in (tmp / "h_killed").iterdir())
    record = json.loads((tmp / "h_killed" / "manifest.rank1.json").read_text())
    harvest_store(model, tmp / "h_killed", paths["corpus"]).harvest(HARVEST_TOKENS, progress=False)
    return {
        "tmp": tmp,
        "one": one,
        "resumed_one": resumed_one,
        "status": [status, status_resume],
        "killed_at": killed_at,
        "n_shards": len(store.manifest()["shards"]),  # type: ignore[index]
        "harvest_left": left,
        "harvest_record": record,
    }
