"""The main job end to end on a tiny random llama: the SAE it trains and evaluates, the co-occurrence counts over the
harvested activations (against a dense ``B.T @ B`` written here), the config it writes, and reuse on a second run."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechscope import HookedModel
from mechscope.apps.main_job import MainJobConfig, run_main_job
from mechscope.cooccurrence import CoocConfig, load_counts
from mechscope.dashboards.outputs import load_dashboards
from mechscope.data import iter_texts, pack_contexts
from mechscope.sae import SparseAutoencoder, evaluate_sae
from mechscope.settings import load

HOOK = "blocks.1.hook_resid_post"


def _job(out_dir: Path, **overrides) -> MainJobConfig:
    """A small job; ``overrides`` by dotted path (``{"train.k": 8}``), as the flags give them."""
    settings = {
        "out_dir": str(out_dir),
        "hook_name": HOOK,
        "context_length": 32,
        "eval_contexts": 4,
        "max_new_tokens": 2,
        "train.n_tokens": 4096,
        "train.expansion_factor": 2,
        "train.k": 4,
        "train.batch_size_tokens": 256,
        "train.shuffle_buffer": 4096,
        "train.dead_tokens_threshold": 2048,
        "cooc.counting.activation_thresholds": [0.0, 0.5],
        "cooc.counting.n_batches": 4,
        "cooc.counting.batch_size_tokens": 512,
        "cooc.analysis.min_subgraph_size": 3,
        "cooc.analysis.max_subgraph_size": 8,
        "cooc.pca.candidate_sizes": [2, 3],
        "cooc.pca.candidates_per_size": 1,
    }
    return load(MainJobConfig, overrides={**settings, **overrides})


@pytest.fixture(scope="module")
def first_run(llama: HookedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[MainJobConfig, dict]:
    job = _job(tmp_path_factory.mktemp("main_job"))
    return job, run_main_job(job, model=llama)


def test_sae_is_trained_on_the_harvest_and_evaluated_on_the_contexts_after_it(llama, first_run) -> None:
    job, result = first_run
    out = Path(job.out_dir)
    sae = SparseAutoencoder.load(out / "sae_training" / "sae")
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_name) == ("topk", 128, 4, HOOK)
    manifest = json.loads((out / "activations" / "manifest.json").read_text())
    harvested = sum(s["n_contexts"] for s in manifest["shards"])
    assert sum(s["n_tokens"] for s in manifest["shards"]) >= job.train.n_tokens
    contexts = pack_contexts(iter_texts(None), llama.tokenizer, job.context_length)
    held_out = torch.stack(list(islice(contexts, harvested, harvested + job.eval_contexts)))
    expected = evaluate_sae(llama, sae, HOOK, tokens=held_out, progress=False).to_dict()
    assert result["sae"] == pytest.approx(expected)
    assert json.loads((out / "sae_evaluation.json").read_text()) == pytest.approx(expected)
    assert (out / "sae_latent_density.png").stat().st_size > 0
    assert (out / "summary.json").exists() and (out / "cache.safetensors").exists()  # the first look
    assert list(json.loads((out / "timings.json").read_text())["stages"]) == list(job.stages)  # model given: no load


def trained_sae_and_rows(out: Path) -> tuple[SparseAutoencoder, torch.Tensor]:
    """The job's SAE and every harvested row ``[rows, d_model]``, read from the shards in corpus order."""
    manifest = json.loads((out / "activations" / "manifest.json").read_text())
    rows = torch.cat([load_file(str(out / "activations" / s["file"]))[HOOK] for s in manifest["shards"]])
    return SparseAutoencoder.load(out / "sae_training" / "sae"), rows


def test_counts_are_over_the_first_harvested_rows(first_run) -> None:
    job, _ = first_run
    out = Path(job.out_dir)
    sae, rows = trained_sae_and_rows(out)
    n = job.cooc.counting.n_batches * job.cooc.counting.batch_size_tokens
    with torch.no_grad():
        latents = sae.encode(rows[:n]).numpy()
    for t in job.cooc.counting.activation_thresholds:
        active = (latents > t).astype(np.int64)
        counts = load_counts(out / "cooc" / HOOK, t)
        assert counts.n_tokens == n
        np.testing.assert_array_equal(counts.counts.toarray(), active.T @ active)
    written = CoocConfig.from_toml(out / "cooc.toml")
    assert written == job.cooc
    assert written.counting.activations_dir == str(out / "activations")
    assert (out / "cooc" / HOOK / "pca").is_dir()


def test_dashboards_cover_every_harvested_row(first_run) -> None:
    job, result = first_run
    out = Path(job.out_dir)
    sae, rows = trained_sae_and_rows(out)
    dash = load_dashboards(out / "dashboards")
    with torch.no_grad():
        latents = sae.encode(rows)
    assert dash.n_tokens == len(rows) == result["dashboards"]["n_tokens"]
    assert torch.equal(dash.firing, (latents > 0).sum(dim=0))
    assert result["dashboards"]["dead"] == int((dash.firing == 0).sum())


def test_a_second_run_reuses_the_sae_its_evaluation_and_the_counts(llama, first_run, capsys) -> None:
    job, result = first_run
    out = Path(job.out_dir)
    weights = (out / "sae_training" / "sae" / "sae_weights.safetensors").read_bytes()
    again = run_main_job(_job(out, stages=["sae", "cooc"]), model=llama)
    printed = capsys.readouterr().out
    assert "Reused the SAE" in printed and "count: already done" in printed
    assert f"mechscope app {out}" in printed  # the job ends with the command that opens the explorer
    assert (out / "sae_training" / "sae" / "sae_weights.safetensors").read_bytes() == weights
    assert again["sae"] == result["sae"]
    assert list(json.loads((out / "timings.json").read_text())["stages"]) == ["sae", "cooc"]  # this run's stages
    for t in job.cooc.counting.activation_thresholds:
        assert again["cooc"]["graphs"][HOOK][t] == result["cooc"]["graphs"][HOOK][t]


def test_the_cooc_stage_needs_a_trained_sae(llama, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the 'sae' stage first"):
        run_main_job(_job(tmp_path, stages=["cooc"]), model=llama)


def test_a_run_with_other_sae_settings_does_not_reuse_the_sae(llama, first_run) -> None:
    job, _ = first_run
    with pytest.raises(ValueError, match=r"holds an SAE trained with other settings \{'k': \(4, 8\)\}"):
        run_main_job(_job(Path(job.out_dir), stages=["sae"], **{"train.k": 8}), model=llama)


def test_bad_pipeline_settings_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"min_subgraph_size=9 is larger than \[analysis\].max_subgraph_size=8"):
        _job(tmp_path, **{"cooc.analysis.min_subgraph_size": 9})
    with pytest.raises(ValueError, match="activation_thresholds must be finite and >= 0"):
        _job(tmp_path, **{"cooc.counting.activation_thresholds": [-1.0]})
    with pytest.raises(ValueError, match=r"candidate_sizes must be list\[int\], got \[2.5\]"):
        _job(tmp_path, **{"cooc.pca.candidate_sizes": [2.5]})
