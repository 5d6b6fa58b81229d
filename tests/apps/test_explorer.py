"""The explorer's views (streamlit.testing AppTest) on a results directory built with the real pipeline on a tiny
random model: harvested activations, an SAE, its dashboards."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM

from mechscope import HookedAutoConfig, HookedModel
from mechscope.apps.cli import main
from mechscope.apps.explorer.launch import RESULTS_ENV, SCRIPT
from mechscope.apps.explorer.render import context_html, effects_html
from mechscope.cooccurrence.config import AnalysisConfig, CoocConfig, CountingConfig, PCAConfig
from mechscope.cooccurrence.layout import file_name, load_pca_results, pca_results_path
from mechscope.cooccurrence.outputs import load_matrix
from mechscope.cooccurrence.pipeline import run_all
from mechscope.dashboards.build import DashboardSettings
from mechscope.dashboards.layout import read_vocab
from mechscope.dashboards.outputs import load_dashboards
from mechscope.dashboards.pipeline import DashboardsConfig, run_dashboards
from mechscope.files import SettingsMismatch
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.sae import SAE, SAEConfig
from mechscope.sae.attribution import ablate
from tests.sae_utils import random_weights

HOOK = "blocks.1.hook_resid_post"


def dashboards_config(root: Path, **overrides) -> DashboardsConfig:
    """The dashboards stage over the fixture's model, SAE and activations."""
    settings = {
        "sae": str(root / "sae"),
        "model": str(root / "model"),
        "activations_dir": str(root / "activations"),
        "context_length": 32,
        "batch_contexts": 4,
        "out_dir": str(root / "dashboards"),
        "progress": False,
        "dashboards": DashboardSettings(n_top=4, window=3),
    }
    return DashboardsConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(HookedAutoConfig("llama")).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    model = HookedModel.from_pretrained(str(root / "model"))
    d = model.cfg.d_model
    sae = SAE(SAEConfig(d, 4 * d, "topk", k=8, hook_name=HOOK))
    sae.load_state_dict(random_weights(d, 4 * d, 0))
    sae.save(root / "sae")
    config = dashboards_config(root, n_tokens=512)
    run_dashboards(config, model=model)
    cooc = CoocConfig(
        CountingConfig(
            model=str(root / "model"),
            sae=str(root / "sae"),
            activations_dir=str(root / "activations"),
            context_length=32,
            batch_contexts=4,
            n_batches=2,
            batch_size_tokens=256,
            activation_thresholds=[0.0],
        ),
        analysis=AnalysisConfig(min_subgraph_size=2, max_subgraph_size=6),
        pca=PCAConfig(candidate_sizes=[2, 3, 4, 5, 6], candidates_per_size=2, n_batches_reconstruction=1),
        results_dir=str(root / "cooc"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no subgraph of size ..." on a random SAE is expected
        run_all(cooc, model=model)
    return root


def app(results: Path, monkeypatch, **params: str) -> AppTest:
    monkeypatch.setenv(RESULTS_ENV, str(results))
    at = AppTest.from_file(str(SCRIPT), default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def test_latent_view_shows_the_top_examples_of_the_latent_in_the_url(results, monkeypatch):
    dash = load_dashboards(results / "dashboards")
    latent = int(dash.firing.argmax())
    at = app(results, monkeypatch, view="latent", latent=str(latent))
    assert not at.exception and not at.error
    assert at.subheader[0].value.startswith(f"Latent {latent} of {dash.d_sae}")
    shown = [h.proto.body for h in at.get("html")][1:]  # the first is the style sheet
    n_top = int((dash.top.context[latent] >= 0).sum())
    assert len(shown) >= n_top
    values = [c.value for c in at.caption[:n_top]]  # each example's activation, most active first
    assert values == [f"{float(v):.2f}" for v in dash.top.values[latent, :n_top]]
    tables = [b for b in shown if b.startswith('<table class="ms-effects"')]  # promoted, then suppressed tokens
    vocab = read_vocab(results / "dashboards")
    for table, kind in zip(tables, ("top", "bottom"), strict=True):
        ids, effects = getattr(dash.logits, f"{kind}_tokens")[latent], getattr(dash.logits, f"{kind}_values")[latent]
        cells = re.findall(r'ms-effect-token">(.*?)</td>.*?</span>([-+][0-9.]+)</td>', table)
        want = [(html.escape(repr(vocab[int(i)])), f"{float(v):+.3f}") for i, v in zip(ids, effects, strict=True)]
        assert cells == want


def test_out_of_range_latent_in_the_url_shows_the_nearest(results, monkeypatch):
    d_sae = load_dashboards(results / "dashboards").d_sae
    at = app(results, monkeypatch, view="latent", latent="99999")
    assert not at.exception
    assert any(f"showing {d_sae - 1}, the nearest" in w.value for w in at.warning)


def test_missing_results_say_which_command_makes_them(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch, view="latent")
    assert not at.exception
    assert "mechscope dashboards CONFIG" in at.error[0].value


def test_inspector_ablation_shows_the_numbers_of_ablate(results, monkeypatch):
    at = app(results, monkeypatch, view="inspector", prompt="hello world")
    assert not at.exception and not at.error, [e.value for e in at.error]
    latents = at.multiselect(key="ablate_latents")
    chosen = latents.options[:2]
    at = latents.set_value([int(c) for c in chosen]).run()
    assert not at.exception and not at.error
    model = HookedModel.from_pretrained(str(results / "model"))
    target = int(at.selectbox(key="target").value)
    want = ablate(
        model, model.to_tokens("hello world"), target, sae=SAE.load(results / "sae"),
        latents=[int(c) for c in chosen], hook_name=HOOK,
    )  # fmt: skip
    assert at.metric[0].value == f"{want.ablated_logit:.3f}"
    assert at.metric[1].value == f"{want.ablated_prob:.4f}"


def test_hostile_tokens_are_rendered_as_text():
    page = context_html(["<script>alert(1)</script>", '"&'], [1.0, 0.5], 1.0, centre=0)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&quot;&amp;" in page
    table = effects_html(["<script>alert(1)</script>", "&"], [2.0, -1.0])
    assert "<script>" not in table and "&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in table
    assert "width: 100.0%; background-color: #1f77b4" in table and "width: 50.0%; background-color: #d62728" in table


def test_the_stage_reuses_its_results_and_refuses_other_settings(results):
    config = dashboards_config(results)
    before = (results / "dashboards" / "dashboards.safetensors").stat().st_mtime_ns
    again = run_dashboards(config)
    assert (results / "dashboards" / "dashboards.safetensors").stat().st_mtime_ns == before
    assert torch.equal(again.top.context, load_dashboards(results / "dashboards").top.context)
    with pytest.raises(SettingsMismatch, match="n_top"):
        run_dashboards(dataclasses.replace(config, dashboards=DashboardSettings(n_top=5, window=3)))


def test_export_command_writes_every_dashboards_folder(results, tmp_path):
    assert main(["export", "neuronpedia", str(results), "--out", str(tmp_path)]) == 0
    batch = json.loads((tmp_path / "dashboards" / "saedashboard" / "batch-0.json").read_text())
    dash = load_dashboards(results / "dashboards")
    assert batch["layer"] == 1 and batch["features"][0]["feature_index"] == int((dash.firing > 0).nonzero()[0, 0])
    upload = json.loads((tmp_path / "dashboards" / "upload" / "batch-0.json").read_text())
    assert upload["source"] == "1-mechscope" and upload["modelId"] == "model"


def first_pca(results: Path):
    hook_dir = results / "cooc" / HOOK
    for size in (2, 3, 4, 5, 6):
        path = pca_results_path(hook_dir, size, 0.0)
        if path.exists() and load_pca_results(path):
            return size, load_pca_results(path)
    raise AssertionError("the fixture's pipeline wrote no PCA results")


def test_cooc_view_shows_a_clicked_point_and_its_latents(results, monkeypatch):
    size, subs = first_pca(results)
    sid = min(subs)
    result = subs[sid]
    at = app(results, monkeypatch, view="cooc", hook=HOOK, t="0_0", size=str(size), sg=str(sid), point="0")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert f"token {result.tokens[0]!r}" in [t.value for t in at.text]
    assert result.contexts[0] in [c.value for c in at.code]
    charts = {c.proto.id: c for c in at.get("plotly_chart")}
    assert len(charts) >= 3  # the PCA, the point's latent bars, the graph


def test_cooc_view_colours_each_point_by_its_most_active_subgraph_latent_when_asked(results, monkeypatch):
    size, subs = first_pca(results)
    sid = min(subs)
    pca = subs[sid].pca
    at = app(results, monkeypatch, view="cooc", hook=HOOK, t="0_0", size=str(size), sg=str(sid))
    at.selectbox(key="landscape").set_value("most active subgraph latent").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)  # the PCA, first on the page (no point clicked)
    coloured = {}
    for trace in figure["data"]:
        for i in trace["customdata"]:
            coloured[i] = trace["name"]
    assert sorted(coloured) == list(range(len(pca.coords)))
    for i, name in coloured.items():  # the plain reading: the largest of the point's subgraph activations
        acts = pca.activations[i].tolist()
        best = max(range(len(acts)), key=lambda j: acts[j])
        assert name == (f"latent {int(pca.nodes[best])}" if acts[best] > 0 else "none active"), (i, acts)


def test_cooc_view_names_a_missing_subgraph_and_shows_the_nearest(results, monkeypatch):
    size, _ = first_pca(results)
    at = app(results, monkeypatch, view="cooc", hook=HOOK, t="0_0", size=str(size), sg="99999")
    assert not at.exception
    assert any("sg='99999'" in w.value for w in at.warning)


def test_cooc_view_without_results_names_the_command(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch, view="cooc")
    assert not at.exception and "mechscope cooc run" in at.error[0].value


def test_latent_view_lists_the_most_cooccurring_latents_and_opens_the_subgraph(results, monkeypatch):
    """The partners shown are the saved Jaccard matrix's row sorted plainly; the buttons open them and the PCA."""
    hook_dir = results / "cooc" / HOOK
    size, subs = first_pca(results)
    sid = min(subs)
    latent = int(subs[sid].pca.nodes[0])
    matrix = load_matrix(hook_dir / file_name("jaccard", 0.0))
    row = matrix[[latent]].toarray()[0] if hasattr(matrix, "toarray") else matrix[latent]
    ranked = sorted((-float(v), j) for j, v in enumerate(row) if j != latent and v > 0)[:10]
    at = app(results, monkeypatch, view="latent", latent=str(latent))
    assert not at.exception and not at.error, [e.value for e in at.error]
    labels = [b.label for b in at.button if b.label.startswith("latent ")]
    assert labels == [f"latent {j} · Jaccard {-v:.3f}" for v, j in ranked]
    assert f"**Subgraph {sid}** ({size} latents at threshold 0)" in [m.value for m in at.markdown]
    at = at.button(key=f"partner_{ranked[0][1]}").click().run()
    assert not at.exception and at.query_params["latent"] == str(ranked[0][1])
    assert at.subheader[0].value.startswith(f"Latent {ranked[0][1]} of")
    at = app(results, monkeypatch, view="latent", latent=str(latent))
    at = at.button(key="open_subgraph").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert (at.query_params["view"], at.query_params["sg"]) == ("cooc", str(sid))
    assert at.header[0].value == "Co-occurrence explorer"
