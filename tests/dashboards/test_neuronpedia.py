"""The Neuronpedia / SAEDashboard export read back and checked against the dashboards, and Neuronpedia's limits."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.dashboards.build import DashboardSettings, chunk_list, compute_dashboards
from mechscope.dashboards.layout import NO_TOKEN
from mechscope.dashboards.neuronpedia import MAX_FEATURES, MAX_LOGITS, MAX_TOKENS, saedashboard_batches
from mechscope.dashboards.outputs import write_neuronpedia_export
from mechscope.sae import SAE, SAEConfig
from tests.dashboards.test_build import D_IN, D_SAE, HOOK, stored_rows
from tests.sae_utils import random_weights

VOCAB = [f"tok{i}" for i in range(30)]


@pytest.fixture(scope="module")
def dash_and_sae():
    sae = SAE(SAEConfig(D_IN, D_SAE, "relu"))
    weights = random_weights(D_IN, D_SAE, 4)
    weights["b_enc"][:3] = -100.0  # three dead latents
    sae.load_state_dict(weights)
    _, chunks = stored_rows(2)
    settings = DashboardSettings(n_top=3, window=2, n_bins=3, per_bin=2, n_logits=25)
    return compute_dashboards(sae, HOOK, chunk_list(chunks), torch.randn(D_IN, 30), None, settings, False), sae


def test_export_reads_back_as_the_dashboards(dash_and_sae, tmp_path):
    dash, sae = dash_and_sae
    write_neuronpedia_export(tmp_path, dash, VOCAB, sae.W_dec, model_id="tiny", layer=0, sae_set="res-ms", batch_size=7)
    batches = sorted((tmp_path / "saedashboard").glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    features = [f for p in batches for f in json.loads(p.read_text())["features"]]
    skipped = json.loads((tmp_path / "saedashboard" / "skipped_indexes.json").read_text())["skipped_indexes"]
    assert skipped == [0, 1, 2] == dash.dead_latents().tolist()
    assert [f["feature_index"] for f in features] == [i for i in range(D_SAE) if i not in skipped]
    assert all(len(json.loads(p.read_text())["features"]) <= 7 for p in batches)
    n_bins = dash.settings.n_bins
    for f in features:
        i = f["feature_index"]
        assert f["frac_nonzero"] == pytest.approx(float(dash.density()[i]))
        assert len(f["pos_str"]) == len(f["pos_values"]) == len(f["neg_str"]) == MAX_LOGITS  # 25 asked, 20 kept
        assert f["pos_str"][0] == VOCAB[int(dash.logits.top_tokens[i, 0])]
        assert f["freq_hist_data_bar_heights"] == dash.histogram[i].tolist()
        top = [a for a in f["activations"] if a["bin_contains"] == -1]
        assert len(top) == int((dash.top.context[i] >= 0).sum())
        for slot, a in enumerate(top):
            kept = dash.top.tokens[i, slot] != NO_TOKEN
            assert a["tokens"] == [VOCAB[int(t)] for t in dash.top.tokens[i, slot][kept]]
            assert a["values"] == pytest.approx(dash.top.activations[i, slot][kept].tolist(), abs=1e-5)
            assert a["values"][a["qualifying_token_index"]] == pytest.approx(float(dash.top.values[i, slot]), abs=1e-5)
            assert len(a["tokens"]) == len(a["values"]) <= MAX_TOKENS
        binned = [a for a in f["activations"] if a["bin_contains"] != -1]
        fractions = {(a["bin_min"], a["bin_max"]): a["bin_contains"] for a in binned}
        assert len(binned) == int((dash.bins.context[i * n_bins : (i + 1) * n_bins] >= 0).sum())
        for a in binned:  # every sampled example lies in its bin
            v = a["values"][a["qualifying_token_index"]]
            assert a["bin_min"] - 1e-5 <= v <= a["bin_max"] + 1e-5
        if len(fractions) == n_bins:  # every bin sampled: with the zeros in the lowest, they cover all tokens
            assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-4)

    upload = json.loads((tmp_path / "upload" / "batch-0.json").read_text())
    assert upload["modelId"] == "tiny" and upload["source"] == "0-res-ms"
    first = upload["features"][0]
    assert first["index"] == features[0]["feature_index"] and first["density"] == features[0]["frac_nonzero"]
    assert len(first["topLogits"]) <= MAX_LOGITS
    for a in first["activations"]:
        assert len(a["tokens"]) == len(a["values"]) and 1 <= len(a["tokens"]) <= MAX_TOKENS
        assert ("quantileFraction" not in a) or 0 <= a["quantileFraction"] <= 1


def test_batches_hold_at_most_128_features(dash_and_sae):
    dash, sae = dash_and_sae
    with pytest.raises(ValueError, match=r"1\.\.128"):
        next(
            saedashboard_batches(
                dash, VOCAB, sae.W_dec, model_id="m", layer=0, sae_set="s", batch_size=MAX_FEATURES + 1
            )
        )
