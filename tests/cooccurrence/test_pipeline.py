"""The co-occurrence pipeline on a tiny random llama and tiny random SAEs: counts against a dense ``B.T @ B`` of the
model's own activations, resuming after an interruption, the stages in sequence, and the errors."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mechscope.cooccurrence.pipeline as pipeline
from mechscope import HookedModel
from mechscope.apps.tables import format_graph_summary
from mechscope.cooccurrence import edge_threshold, jaccard, load_counts, subgraphs
from mechscope.cooccurrence.config import AnalysisConfig, CoocConfig, CountingConfig, PCAConfig
from mechscope.cooccurrence.layout import KINDS
from mechscope.cooccurrence.pipeline import CHECKPOINT, run_all, run_count
from mechscope.data import ActivationStore, iter_texts, pack_contexts
from mechscope.sae import SAEConfig, SparseAutoencoder
from tests.sae_utils import random_weights

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]
CONTEXT, BATCH_CONTEXTS, BATCH_ROWS, N_BATCHES = 16, 3, 23, 5  # batches of 23 rows end inside passes of 45 rows
THRESHOLDS = [0.0, 0.3]
SPECIAL = 256  # the byte tokenizer's BOS = EOS = PAD
TEXT = (
    "Sparse autoencoders split a model's activations into many latents, few of them active on any one token. "
    "Latents that fire together on the same tokens form groups, and the groups span small subspaces whose "
    "geometry tells us how the model composes features. Counting which latents fire together is exact here: "
    "each batch of tokens becomes a sparse boolean matrix and its product with itself adds to the counts. "
    "An interrupted count resumes from its checkpoint without counting a token twice or losing one. "
)


def _sae(architecture: str, hook: str, seed: int) -> SparseAutoencoder:
    k = 6 if architecture == "topk" else None
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=48, architecture=architecture, k=k, hook_name=hook))
    weights = random_weights(64, 48, seed, threshold=architecture == "jumprelu")
    sae.load_state_dict({name: weights[name] for name, _ in sae.state_dict().items()})
    return sae.eval()


@pytest.fixture(scope="module")
def saes() -> dict[str, SparseAutoencoder]:
    return {HOOKS[0]: _sae("topk", HOOKS[0], 0), HOOKS[1]: _sae("jumprelu", HOOKS[1], 1)}


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _config(tmp_path: Path, corpus: str, name: str = "results", **counting) -> CoocConfig:
    settings = {
        "model": "random-llama",
        "corpus": corpus,
        "context_length": CONTEXT,
        "batch_contexts": BATCH_CONTEXTS,
        "batch_size_tokens": BATCH_ROWS,
        "n_batches": N_BATCHES,
        "activation_thresholds": THRESHOLDS,
        **counting,
    }
    return CoocConfig(CountingConfig(**settings), results_dir=str(tmp_path / name))


def _reference_rows(model: HookedModel, corpus: str, hook: str, n_rows: int) -> torch.Tensor:
    """The hook's activations ``[n_rows, d]`` at the non-special tokens of the packed corpus, in order, computed
    with plain ``run_with_cache`` over the same groups of contexts the store runs."""
    contexts = torch.stack(list(pack_contexts(iter_texts(corpus), model.tokenizer, CONTEXT)))
    rows = []
    for start in range(0, len(contexts), BATCH_CONTEXTS):
        tokens = contexts[start : start + BATCH_CONTEXTS]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[hook])
        rows.append(cache[hook][tokens != SPECIAL])
    return torch.cat(rows)[:n_rows]


def _reference_counts(sae: SparseAutoencoder, rows: torch.Tensor, t: float, fold: bool = True) -> np.ndarray:
    """Dense ``B.T @ B`` with ``B = latents > t (+ JumpReLU threshold)``, encoding batch by batch; with ``fold`` the
    latents and the threshold are those of the SAE with its decoder norms folded into its encoder (each latent's
    activation and threshold times its decoder row's norm)."""
    latents = torch.cat([sae.encode(x) for x in rows.split(BATCH_ROWS)])
    base = sae.threshold.detach() if sae.cfg.architecture == "jumprelu" else torch.zeros(sae.cfg.d_sae)
    norms = sae.W_dec.detach().norm(dim=-1) if fold else torch.ones(sae.cfg.d_sae)
    b = (latents * norms > t + base * norms).long()
    return (b.T @ b).numpy()


def test_counts_equal_a_dense_reference_of_the_models_activations(llama, saes, corpus, tmp_path) -> None:
    config = _config(tmp_path, corpus)
    counts = run_count(config, llama, saes)
    n_rows = N_BATCHES * BATCH_ROWS
    reference_rows = {hook: _reference_rows(llama, corpus, hook, n_rows) for hook in saes}
    for hook, sae in saes.items():
        rows = reference_rows[hook]
        assert len(rows) == n_rows
        for t in THRESHOLDS:
            expected = _reference_counts(sae, rows, t)
            assert expected[np.triu_indices(48, 1)].sum() > 0, "the test needs co-occurring latents"
            assert counts[hook][t].n_tokens == n_rows
            np.testing.assert_array_equal(counts[hook][t].counts.toarray(), expected)
            saved = load_counts(tmp_path / "results" / hook, t)  # the files save_counts wrote
            np.testing.assert_array_equal(saved.counts.toarray(), expected)
            assert saved.n_tokens == n_rows
        assert json.loads((tmp_path / "results" / hook / "feature_acts_cooc_n_tokens.json").read_text()) == {
            str(t): n_rows for t in THRESHOLDS
        }
    # special tokens kept: more rows per context, so other rows and other counts
    kept = run_count(_config(tmp_path, corpus, "kept", remove_special_tokens=False), llama, saes)
    assert not np.array_equal(kept[HOOKS[0]][0.0].counts.toarray(), counts[HOOKS[0]][0.0].counts.toarray())
    # without folding the decoder norms (these decoder rows have norms 0.8 to 1.2): the raw activations' counts
    raw = run_count(_config(tmp_path, corpus, "raw", fold_decoder_norms=False), llama, saes)
    for hook, sae in saes.items():
        expected = _reference_counts(sae, reference_rows[hook], 0.3, fold=False)
        np.testing.assert_array_equal(raw[hook][0.3].counts.toarray(), expected)
        assert not np.array_equal(raw[hook][0.3].counts.toarray(), counts[hook][0.3].counts.toarray())


class CountedBatches:
    """An ``on_batch`` hook: records the row count of every batch counted and raises on batch ``fail_on`` (1-based),
    as a kill would (before that batch is checkpointed)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on, self.calls = fail_on, []

    def __call__(self, batches_done: int, rows: dict) -> None:
        if batches_done == self.fail_on:
            raise KeyboardInterrupt
        self.calls.append(len(rows["tokens"]))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for hook in a:
        for t in THRESHOLDS:
            assert a[hook][t].n_tokens == b[hook][t].n_tokens
            np.testing.assert_array_equal(a[hook][t].counts.toarray(), b[hook][t].counts.toarray())


def _saved(results: Path) -> dict:
    """The counts the count stage wrote with ``save_counts``."""
    return {hook: {t: load_counts(results / hook, t) for t in THRESHOLDS} for hook in HOOKS}


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_an_interrupted_count_resumes_to_the_uninterrupted_counts(llama, saes, corpus, tmp_path, checkpoint_every):
    full = run_count(_config(tmp_path, corpus, "full"), llama, saes)
    config = _config(tmp_path, corpus, "resumed", checkpoint_every=checkpoint_every)
    counted = CountedBatches(fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        run_count(config, llama, saes, on_batch=counted)
    assert len(counted.calls) == 3
    saved = 3 - 3 % checkpoint_every  # batches in the last checkpoint; later ones are counted again
    with np.load(tmp_path / "resumed" / CHECKPOINT) as data:
        state = json.loads(data["state"].item())
    assert (state["batches_done"], state["n_tokens"]) == (saved, saved * BATCH_ROWS)
    assert not (tmp_path / "resumed" / HOOKS[0]).exists()  # nothing final is written before the count ends

    counted = CountedBatches()
    resumed = run_count(config, llama, saes, on_batch=counted)
    assert counted.calls == [BATCH_ROWS] * (N_BATCHES - saved)  # each batch counted once
    _assert_same(resumed, full)
    _assert_same(_saved(tmp_path / "resumed"), full)

    counted = CountedBatches()
    again = run_count(config, llama, saes, on_batch=counted)  # a finished count is skipped
    assert counted.calls == []
    _assert_same(again, full)

    (tmp_path / "resumed" / HOOKS[1] / "feature_acts_cooc_n_tokens.json").unlink()  # files lost: written again
    _assert_same(run_count(config, llama, saes, on_batch=counted), full)
    assert counted.calls == []
    _assert_same(_saved(tmp_path / "resumed"), full)


def test_stop_after_then_more_batches_extends_the_count(llama, saes, corpus, tmp_path) -> None:
    counted = CountedBatches()
    run_count(_config(tmp_path, corpus, "ext"), llama, saes, stop_after=2, on_batch=counted)
    assert counted.calls == [BATCH_ROWS] * 2
    assert not (tmp_path / "ext" / HOOKS[0]).exists()
    run_count(_config(tmp_path, corpus, "ext", n_batches=3), llama, saes, on_batch=counted)
    assert _saved(tmp_path / "ext")[HOOKS[0]][0.0].n_tokens == 3 * BATCH_ROWS
    run_count(_config(tmp_path, corpus, "ext"), llama, saes, on_batch=counted)
    assert counted.calls == [BATCH_ROWS] * N_BATCHES
    _assert_same(_saved(tmp_path / "ext"), run_count(_config(tmp_path, corpus, "full"), llama, saes))


def test_shards_in_activations_dir_give_the_live_counts(llama, saes, corpus, tmp_path) -> None:
    live = run_count(_config(tmp_path, corpus, "live"), llama, saes)
    shards = tmp_path / "shards"
    kwargs = dict(context_length=CONTEXT, batch_contexts=BATCH_CONTEXTS, activations_dir=shards, shard_tokens=50)
    # a previous harvest (e.g. for SAE training) that holds fewer rows than needed: it is extended
    ActivationStore(llama, HOOKS, corpus, **kwargs).harvest(60)
    from_shards = run_count(_config(tmp_path, corpus, "sharded", activations_dir=str(shards)), llama, saes)
    _assert_same(from_shards, live)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(s["n_tokens"] for s in manifest["shards"]) >= N_BATCHES * BATCH_ROWS


def test_a_corpus_that_runs_out_counts_every_row_and_warns(llama, saes, corpus, tmp_path) -> None:
    n_rows = len(_reference_rows(llama, corpus, HOOKS[0], 10**6))
    n_batches = -(-n_rows // BATCH_ROWS)
    assert n_rows % BATCH_ROWS and n_batches < 100  # the last batch is partial
    with pytest.warns(UserWarning, match=f"the corpus ran out after {n_batches} of 100 batches \\({n_rows} tokens"):
        counts = run_count(_config(tmp_path, corpus, n_batches=100), llama, saes)
    assert counts[HOOKS[0]][0.0].n_tokens == n_rows
    assert counts[HOOKS[0]][0.0].activations.sum() == n_rows * 6  # topk: 6 latents per token, all positive here


def test_errors_name_the_fix(llama, saes, corpus, tmp_path) -> None:
    run_count(_config(tmp_path, corpus), llama, saes, stop_after=1)
    with pytest.raises(ValueError, match=r"other settings \{'batch_size_tokens': \(23, 24\)\}.*another results_dir"):
        run_count(_config(tmp_path, corpus, batch_size_tokens=24), llama, saes)
    other = {**saes, HOOKS[1]: _sae("jumprelu", HOOKS[1], 5)}
    with pytest.raises(ValueError, match=r"other settings .*sae_sha256"):
        run_count(_config(tmp_path, corpus), llama, other)
    wide = SparseAutoencoder(SAEConfig(d_in=32, d_sae=8, hook_name=HOOKS[0]))
    with pytest.raises(ValueError, match="d_in=32 but that hook of 'random-llama' is 64 wide"):
        run_count(_config(tmp_path, corpus, "wide"), llama, wide)
    with pytest.raises(ValueError, match=r"no SAE: set \[counting\]\.sae"):
        run_count(_config(tmp_path, corpus, "none"), llama)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        run_count(_config(tmp_path, corpus, "bad", hook_names=["blocks.9.hook_resid_post"]), llama, saes[HOOKS[0]])
    assert not (tmp_path / "wide").exists() and not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()


def test_saes_load_from_paths_by_hook_name(llama, saes, corpus, tmp_path) -> None:
    paths = {hook: str(sae.save(tmp_path / f"sae{i}")) for i, (hook, sae) in enumerate(saes.items())}
    loaded = run_count(_config(tmp_path, corpus, "paths", sae=paths, hook_names=[HOOKS[1]]), llama)
    assert list(loaded) == [HOOKS[1]]
    one = run_count(_config(tmp_path, corpus, "one", sae=paths[HOOKS[0]]), llama)  # hook: the SAE's hook_name
    direct = run_count(_config(tmp_path, corpus, "direct"), llama, saes)
    _assert_same(loaded, {HOOKS[1]: direct[HOOKS[1]]})
    _assert_same(one, {HOOKS[0]: direct[HOOKS[0]]})


def test_run_all_runs_the_stages_in_order_and_prints_where_the_results_are(llama, saes, corpus, tmp_path, capsys):
    from mechscope.cooccurrence import load_partners, summary, top_cooccurring
    from mechscope.cooccurrence.layout import load_pca_results, partners_path, pca_results_path

    config = _config(tmp_path, corpus)
    config.analysis = AnalysisConfig(min_subgraph_size=3, max_subgraph_size=6, n_cooccurring=4)
    config.pca = PCAConfig(candidate_sizes=[2, 5, 6, 40], candidates_per_size=2, n_batches_reconstruction=2)
    with pytest.warns(UserWarning) as caught:
        out = run_all(config, llama, saes)
    no_subgraph = [str(w.message) for w in caught if "for the PCA" in str(w.message)]
    assert len(no_subgraph) == len(HOOKS) * len(THRESHOLDS) and all("40]" in m for m in no_subgraph)
    printed = capsys.readouterr().out
    results = tmp_path / "results"
    assert f"Results in {results.resolve()}" in printed
    printed += format_graph_summary(out["graphs"])  # the table the command line prints after the stages
    written = json.loads((results / "summary.json").read_text())
    n_found = 0
    for hook in HOOKS:
        for t in THRESHOLDS:
            c = out["counts"][hook][t]
            j = jaccard(c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a Jaccard-1 group of more than 6 latents: run_all warned already
                edge = edge_threshold(j, 3, 6)
            subs = subgraphs(j, edge.threshold)
            expected = summary(subs, c.n_tokens, c.activations)
            got = out["graphs"][hook][t]
            assert {k: got[k] for k in expected} == pytest.approx(expected)
            assert got["edge_threshold"] == edge.threshold
            assert got["largest_subgraph"] == max(len(s.nodes) for s in subs) <= 6
            assert written[hook][str(t)] == json.loads(json.dumps(got, default=str))
            assert f"{hook} @ {t:g} histogram: {got['histogram']}" in printed
            partners = load_partners(partners_path(results / hook, t))
            assert np.array_equal(partners.latents, top_cooccurring(j, 4).latents)
            assert pipeline.load_subgraphs(config, hook, t) == subs
            assert out["pca"][hook][t] == [pca_results_path(results / hook, size, t) for size in (2, 5, 6, 40)]
            for size in (2, 5, 6, 40):
                found = load_pca_results(pca_results_path(results / hook, size, t))
                assert set(found) <= {s.id for s in subs if len(s.nodes) == size}
                n_found += len(found)
    assert n_found >= 3  # the tiny random model's latents form few subgraphs, but some get a PCA
    table = printed.split("Co-occurrence graphs")[1].splitlines()[1 : 3 + 2 * len(THRESHOLDS)]
    assert len({len(line) for line in table}) == 1, "summary table columns are not aligned"

    # the reference's edge threshold search and files, on the same results folder
    config.analysis = AnalysisConfig(min_subgraph_size=3, max_subgraph_size=6, edge_threshold_method="bisection")
    config.output_format = "sae_cooccurrence"
    counted = CountedBatches()
    again = run_count(config, llama, saes, on_batch=counted)  # counted already: the reference's files are written
    assert counted.calls == []  # and nothing is counted again
    _assert_same(again, out["counts"])
    graphs = pipeline.run_graphs(config, llama, saes)
    for hook in HOOKS:
        names = {p.name for p in (results / hook).glob("*.npz")}
        assert names == {f"feature_acts_cooc_{k}_threshold_{t}.npz" for k in KINDS for t in ("0_0", "0_3")}
        with (results / hook / "edge_thresholds.csv").open() as f:
            edges = {float(a): float(e) for a, e in list(csv.reader(f))[1:]}
        for t in THRESHOLDS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bisection = edge_threshold(jaccard(out["counts"][hook][t]), 3, 6, method="bisection")
            assert graphs[hook][t]["edge_threshold"] == edges[t] == bisection.threshold
            tag = str(t).replace(".", "_")
            assert (results / hook / "thresholded_matrices" / f"sparse_thresholded_matrix_{tag}.npz").exists()
            assert pipeline.load_subgraphs(config, hook, t) == subgraphs(jaccard(out["counts"][hook][t]), edges[t])
