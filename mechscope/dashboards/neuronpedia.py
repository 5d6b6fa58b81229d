"""The dashboards in the formats SAEDashboard and Neuronpedia read.

- :func:`saedashboard_batches`: SAEDashboard's ``NeuronpediaRunner`` batch files (``batch-N.json``: ``model_id``,
  ``layer``, ``sae_set``, ``sae_id_suffix``, ``features``), which Neuronpedia's importer converts. Per feature:
  ``feature_index``, ``pos_str``/``pos_values``, ``neg_str``/``neg_values`` (the logit effects), ``frac_nonzero``,
  ``freq_hist_data_bar_heights``/``_values`` (the activation histogram: counts and bin centres), the neuron
  alignment of the decoder row (its 3 largest entries by magnitude and their share of its L1 norm), and
  ``activations``: the top examples (``bin_min`` -1, ``bin_max`` the max activation, ``bin_contains`` -1) and the
  binned samples (``bin_min``/``bin_max`` the bin's edges, ``bin_contains`` the fraction of all tokens in it; as
  SAEDashboard, the lowest bin also counts the tokens where the latent is 0), each with its ``tokens`` (strings),
  ``values`` and ``qualifying_token_index``. Fields mechscope does not compute (correlated neurons and features,
  the logit histogram, DFA) are empty lists.
- :func:`upload_batches`: the body of Neuronpedia's ``POST /api/feature/upload-batch`` (``modelId``, ``source``,
  ``features``: ``index``, ``density``, ``topLogits``/``bottomLogits``, ``activations`` with ``tokens``, ``values``,
  ``quantileMin``/``quantileMax``/``quantileFraction``; the top examples carry no quantile fields).

Limits, as Neuronpedia's route enforces them: at most :data:`MAX_FEATURES` features a batch, :data:`MAX_TOKENS`
tokens an example, :data:`MAX_LOGITS` logits a side. Dead latents go in ``skipped_indexes`` (SAEDashboard's
``skipped_indexes.json``) and in no batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mechscope.dashboards.build import Dashboards
from mechscope.dashboards.layout import NO_TOKEN

MAX_FEATURES, MAX_TOKENS, MAX_LOGITS = 128, 1024, 20
DIGITS = 5  # SAEDashboard rounds every float to 5 decimals


def _round(values: list[float]) -> list[float]:
    return [round(float(v), DIGITS) for v in values]


def _example(tokens: torch.Tensor, values: torch.Tensor, vocab: list[str]) -> dict[str, Any]:
    """One example's stored tokens (positions the store does not hold dropped), their values, and the index of the
    example's own token among them."""
    centre = tokens.numel() // 2
    kept = (tokens != NO_TOKEN).nonzero()[:, 0]
    kept = kept[(kept - centre).abs().argsort(stable=True)[:MAX_TOKENS]].sort().values
    return {
        "tokens": [vocab[int(t)] for t in tokens[kept]],
        "values": _round(values[kept].tolist()),
        "qualifying_token_index": int((kept < centre).sum()),
    }


def _examples(dash: Dashboards, latent: int, vocab: list[str]) -> list[dict[str, Any]]:
    out = []
    top = dash.top
    for slot in (top.context[latent] >= 0).nonzero()[:, 0].tolist():
        example = _example(top.tokens[latent, slot], top.activations[latent, slot], vocab)
        out.append(
            {"bin_min": -1, "bin_max": round(float(dash.max_activation[latent]), DIGITS), "bin_contains": -1, **example}
        )
    n_bins = dash.settings.n_bins
    zeros = dash.n_tokens - int(dash.firing[latent])
    for b in reversed(range(n_bins)):
        group = latent * n_bins + b
        contains = (int(dash.bin_counts[group]) + (zeros if b == 0 else 0)) / max(dash.n_tokens, 1)
        low, high = dash.bin_edges[latent, b], dash.bin_edges[latent, b + 1]
        for slot in (dash.bins.context[group] >= 0).nonzero()[:, 0].tolist():
            example = _example(dash.bins.tokens[group, slot], dash.bins.activations[group, slot], vocab)
            out.append(
                {
                    "bin_min": round(float(low), DIGITS),
                    "bin_max": round(float(high), DIGITS),
                    "bin_contains": round(contains, DIGITS),
                    **example,
                }
            )
    return out


def _feature(dash: Dashboards, latent: int, vocab: list[str], W_dec_row: torch.Tensor) -> dict[str, Any]:  # noqa: N803
    n = min(MAX_LOGITS, dash.logits.top_tokens.shape[1])
    edges = dash.histogram_edges[latent]
    align = W_dec_row.abs().topk(min(3, W_dec_row.numel()))
    l1 = float(W_dec_row.abs().sum()) or 1.0
    return {
        "feature_index": latent,
        "neuron_alignment_indices": align.indices.tolist(),
        "neuron_alignment_values": _round(W_dec_row[align.indices].tolist()),
        "neuron_alignment_l1": _round((align.values / l1).tolist()),
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [vocab[int(t)] for t in dash.logits.bottom_tokens[latent, :n]],
        "neg_values": _round(dash.logits.bottom_values[latent, :n].tolist()),
        "pos_str": [vocab[int(t)] for t in dash.logits.top_tokens[latent, :n]],
        "pos_values": _round(dash.logits.top_values[latent, :n].tolist()),
        "frac_nonzero": round(float(dash.density()[latent]), 8),
        "freq_hist_data_bar_heights": dash.histogram[latent].tolist(),
        "freq_hist_data_bar_values": _round(((edges[:-1] + edges[1:]) / 2).tolist()),
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
        "vector": [],
        "activations": _examples(dash, latent, vocab),
    }


def live_latents(dash: Dashboards) -> list[int]:
    """The latents that fired at least once (the others are listed as skipped)."""
    return (dash.firing > 0).nonzero()[:, 0].tolist()


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def saedashboard_batches(
    dash: Dashboards,
    vocab: list[str],
    W_dec: torch.Tensor,  # noqa: N803 (the SAE's name)
    *,
    model_id: str,
    layer: int,
    sae_set: str,
    sae_id_suffix: str | None = None,
    batch_size: int = MAX_FEATURES,
) -> Iterator[dict[str, Any]]:
    """SAEDashboard's ``batch-N.json`` contents, ``batch_size`` (at most 128) live latents each, in index order."""
    if not 1 <= batch_size <= MAX_FEATURES:
        raise ValueError(f"batch_size={batch_size}: Neuronpedia takes 1..{MAX_FEATURES} features a batch")
    W_dec = W_dec.detach().float().cpu()  # noqa: N806
    for latents in _chunks(live_latents(dash), batch_size):
        yield {
            "model_id": model_id,
            "layer": layer,
            "sae_set": sae_set,
            "sae_id_suffix": sae_id_suffix,
            "features": [_feature(dash, i, vocab, W_dec[i]) for i in latents],
        }


def skipped_indexes(dash: Dashboards, *, model_id: str, layer: int, sae_set: str) -> dict[str, Any]:
    """SAEDashboard's ``skipped_indexes.json``: the dead latents."""
    return {
        "model_id": model_id,
        "layer": str(layer),
        "sae_set": sae_set,
        "skipped_indexes": dash.dead_latents().tolist(),
    }


def upload_batch(batch: dict[str, Any], source: str) -> dict[str, Any]:
    """One SAEDashboard batch as the body of Neuronpedia's ``POST /api/feature/upload-batch``; ``source`` is the
    Neuronpedia source id (``"12-res-jb"``)."""
    features = []
    for f in batch["features"]:
        activations = []
        for a in f["activations"]:
            entry = {"tokens": a["tokens"], "values": a["values"]}
            if a["bin_contains"] >= 0:  # binned samples; the top examples have no quantile
                entry.update(quantileMin=a["bin_min"], quantileMax=a["bin_max"], quantileFraction=a["bin_contains"])
            activations.append(entry)
        features.append(
            {
                "index": f["feature_index"],
                "density": f["frac_nonzero"],
                "topLogits": [{"token": t, "value": v} for t, v in zip(f["pos_str"], f["pos_values"], strict=True)],
                "bottomLogits": [{"token": t, "value": v} for t, v in zip(f["neg_str"], f["neg_values"], strict=True)],
                "activations": activations,
            }
        )
    return {"modelId": batch["model_id"], "source": source, "features": features}
