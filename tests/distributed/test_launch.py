"""``mechscope cooc run CONFIG --nproc 2`` launches torchrun itself: two ranks harvest to ``activations_dir`` and
count what one process counts, rank 0 alone prints and builds the graphs and the PCA (reading the shards alone); a
stage that does not share its work refuses to run in several processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mechscope import HookedAutoConfig, HookedModel
from mechscope.apps.cli import main
from mechscope.cooccurrence import load_counts
from mechscope.cooccurrence.config import CoocConfig
from mechscope.cooccurrence.pipeline import run_count
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.sae import SAEConfig, SparseAutoencoder, load_sae
from tests.distributed import harness
from tests.sae_utils import random_weights

HOOK = "blocks.1.hook_resid_post"


def test_nproc_runs_the_cooc_pipeline_in_two_processes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(HookedAutoConfig("llama")).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, hook_name=HOOK))
    sae.load_state_dict(random_weights(64, 32, 0))
    sae.save(tmp_path / "sae")
    (tmp_path / "corpus.txt").write_text("Latents that fire together on the same tokens form small groups. " * 8)
    toml = tmp_path / "cooc.toml"
    toml.write_text(
        f'results_dir = "{tmp_path / "results"}"\n[counting]\nmodel = "{tmp_path / "model"}"\n'
        f'sae = "{tmp_path / "sae"}"\ncorpus = "{tmp_path / "corpus.txt"}"\ncontext_length = 16\n'
        f'activations_dir = "{tmp_path / "acts"}"\n'
        "n_batches = 5\nbatch_size_tokens = 20\nactivation_thresholds = [0.0, 0.1]\n"
        "[analysis]\nmin_subgraph_size = 2\nmax_subgraph_size = 4\n[pca]\ncandidate_sizes = [2]\n"
        "n_batches_reconstruction = 1\n"
    )
    command = [sys.executable, "-m", "mechscope", "cooc", "run", str(toml), "--nproc", "2"]
    launch = subprocess.Popen(command, env=harness._env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    config = CoocConfig.from_toml(toml)
    config.results_dir = str(tmp_path / "one")
    expected = run_count(config, HookedModel.from_pretrained(str(tmp_path / "model")), load_sae(tmp_path / "sae"))
    try:
        out, err = launch.communicate(timeout=harness.TIMEOUT)
    except subprocess.TimeoutExpired:
        launch.kill()
        raise
    assert launch.returncode == 0, err.decode()
    out_text = out.decode()
    assert out_text.count("count: 100 tokens in 5 batches") == 1  # printed by rank 0 only
    assert out_text.count("Co-occurrence graphs") == 1
    assert (tmp_path / "results" / HOOK / "graph_summary_0_1.json").exists()
    for t in (0.0, 0.1):
        saved = load_counts(tmp_path / "results" / HOOK, t)
        assert saved.n_tokens == expected[HOOK][t].n_tokens == 100
        np.testing.assert_array_equal(saved.counts.toarray(), expected[HOOK][t].counts.toarray())


@pytest.mark.parametrize("argv", [["demo"], ["cooc", "graphs", "c.toml"]])
def test_a_stage_that_does_not_share_its_work_refuses_several_processes(argv, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    assert main(argv) == 1
    err = capsys.readouterr().err
    command = " ".join(argv[:2]) if argv[0] in ("sae", "cooc") else argv[0]
    assert f"mechscope {command}: error: mechscope {command} does not run data-parallel yet" in err
    assert "does not run data-parallel yet: run it in one process (without torchrun)" in err


def test_nproc_below_one_is_refused(capsys) -> None:
    assert main(["cooc", "count", "c.toml", "--nproc", "0"]) == 1
    assert "--nproc 0: give at least 1 process" in capsys.readouterr().err
