"""Graph-stage outputs: top tokens per latent, the CSV / Parquet node table, each latent's most co-occurring latents,
the size histogram, and the SAE's Neuronpedia id."""

from __future__ import annotations

import csv
import json
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from matplotlib.image import imread

from mechscope.cooccurrence import (
    EdgeThreshold,
    LatentTokens,
    graph_results,
    latent_tokens,
    load_partners,
    node_table,
    save_graphs,
    subgraphs,
    top_cooccurring,
)
from mechscope.cooccurrence.layout import partners_path, read_node_table
from mechscope.sae import SAE, SAEConfig, load_sae
from tests.sae_utils import random_weights

HOSTILE = [
    "</script><script>alert(1)</script>",
    "<!-- x",
    "a&amp;b",
    '"quoted"',
    "new\nline",
    "\u2028",
    "<b>x</b>",
    "'",
]


class Letters:
    """A tokenizer whose token ``t`` decodes to the ``t``-th letter."""

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [chr(ord("a") + t[0]) for t in ids]


def test_latent_tokens_on_a_hand_made_vocabulary():
    # vocabulary a..e; the dot products below are worked out by hand
    embed = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.4, 0], [-1, 0, 0.1]])
    unembed = torch.tensor([[0, 1, 0, 0.3, 0], [1, 0, 0, 0.3, -1], [0, 0, 1, 0.3, 0]])
    decoder = torch.tensor([[1, 0, 0], [0, 0, 2], [0.1, -1, 0.2]])
    result = latent_tokens(decoder, embed, unembed, Letters(), k=2, batch_size=2)
    # latent 0: embeddings . decoder = (1, 0, 0, 0.5, -1); logits = (0, 1, 0, 0.3, 0)
    # latent 1: (0, 0, 2, 0, 0.2); (0, 0, 2, 0.6, 0)
    # latent 2: (0.1, -1, 0.2, -0.35, -0.08); (-1, 0.1, 0.2, -0.21, 1)
    assert result.top_input == [["a", "d"], ["c", "e"], ["c", "a"]]
    assert result.top_output == [["b", "d"], ["c", "d"], ["e", "c"]]
    everything = latent_tokens(decoder, embed, unembed, Letters(), k=10)
    top = everything.top_input[0]  # k is capped at the 5 tokens; b and c tie at 0
    assert (top[:2], set(top[2:4]), top[4]) == (["a", "d"], {"b", "c"}, "e")
    assert [len(row) for row in everything.top_output] == [5, 5, 5]


def test_latent_tokens_match_a_plain_loop_on_a_real_tokenizer(llama):
    vocab = 257  # the tiny model's tokenizer decodes these; the rest of its 50k rows decode to ""
    embed, unembed = llama.W_E[:vocab].detach(), llama.W_U[:, :vocab].detach()
    decoder = torch.randn(23, embed.shape[1], generator=torch.Generator().manual_seed(0))
    result = latent_tokens(decoder, embed, unembed, llama.tokenizer, k=7, batch_size=5)
    for i in range(23):
        ids_in = torch.topk(embed @ decoder[i], 7).indices.tolist()
        assert result.top_input[i] == [llama.tokenizer.decode([t]) for t in ids_in]
        logits = (decoder[i].double().numpy() @ unembed.double().numpy()).ravel()
        ids_out = np.argsort(-logits)[:7].tolist()
        assert result.top_output[i] == [llama.tokenizer.decode([t]) for t in ids_out]
    assert len({tuple(row) for row in result.top_input}) > 1  # the latents differ


STAR = sp.csr_array(
    np.array(
        [
            [1, 0.5, 0.5, 0.5, 0, 0],
            [0.5, 1, 0, 0, 0, 0],
            [0.5, 0, 1, 0.25, 0, 0],
            [0.5, 0, 0.25, 1, 0, 0],
            [0, 0, 0, 0, 1, 0.9],
            [0, 0, 0, 0, 0.9, 1],
        ]
    )
)
ACTS = np.array([10, 4, 3, 2, 7, 7])


def hostile_tokens(n: int) -> LatentTokens:
    return LatentTokens(
        top_input=[[HOSTILE[(i + j) % len(HOSTILE)] for j in range(3)] for i in range(n)],
        top_output=[[f" out{i}", HOSTILE[i % len(HOSTILE)]] for i in range(n)],
    )


def test_node_table_parquet_and_csv_with_tokens_and_links(tmp_path):
    subs = subgraphs(STAR, 0.2)
    tokens = hostile_tokens(6)
    graphs = graph_results(
        subs, 2.0, EdgeThreshold(0.25, 4, True), ACTS, 8, tokens=tokens, neuronpedia_id="gpt2-small/0-res-jb"
    )
    result = save_graphs(tmp_path, graphs)

    def quicklist(nodes: list[int]) -> str:  # Neuronpedia's quick-list URL: a URL-quoted JSON list of features
        features = ", ".join(f'{{"modelId": "gpt2-small", "layer": "0-res-jb", "index": "{n}"}}' for n in nodes)
        return "https://neuronpedia.org/quick-list/?name=temporary_list&features=" + quote(f"[{features}]")

    expected = [
        {  # the reference's columns in its order, then mechscope's
            "node_id": node,
            "activity_threshold": 2.0,
            "subgraph_id": 0 if node < 4 else 1,
            "subgraph_size": 4 if node < 4 else 2,
            "feature_activations": int(ACTS[node]),
            "top_10_tokens": [HOSTILE[(node + j) % len(HOSTILE)] for j in range(3)],
            "neuronpedia_link": f"https://neuronpedia.org/gpt2-small/0-res-jb/{node}",
            "quicklist_link": quicklist([0, 1, 2, 3] if node < 4 else [4, 5]),
            "top_output_tokens": [f" out{node}", HOSTILE[node % len(HOSTILE)]],
        }
        for node in range(6)
    ]
    assert "%22index%22%3A%20%225%22%7D%5D" in expected[5]["quicklist_link"]
    assert node_table(subs, 2.0, ACTS, tokens=tokens, neuronpedia_id="gpt2-small/0-res-jb") == expected
    table = pq.read_table(tmp_path / "dataframes" / "node_info_df_2_0.parquet")
    assert table.to_pylist() == expected
    assert table.schema.field("top_10_tokens").type == pa.list_(pa.string())
    assert table.schema.field("feature_activations").type == pa.int64()
    with open(tmp_path / "dataframes" / "node_info_df_2_0.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(expected[0])
    for row, want in zip(rows, expected, strict=True):
        assert json.loads(row["top_10_tokens"]) == want["top_10_tokens"]
        assert json.loads(row["top_output_tokens"]) == want["top_output_tokens"]
        assert (row["neuronpedia_link"], row["quicklist_link"]) == (want["neuronpedia_link"], want["quicklist_link"])
        assert (int(row["node_id"]), float(row["activity_threshold"])) == (want["node_id"], 2.0)
        assert int(row["feature_activations"]) == want["feature_activations"]
    assert result["histogram"] == str(tmp_path / "subgraph_sizes_2_0.png")
    assert json.loads((tmp_path / "graph_summary_2_0.json").read_text()) == result


def test_metric_columns_reach_the_parquet_table(tmp_path):
    subs = subgraphs(STAR, 0.2)
    save_graphs(tmp_path, graph_results(subs, 1.5, EdgeThreshold(0.25, 4, True), ACTS, 8, include_metrics=True))
    table = pq.read_table(tmp_path / "dataframes" / "node_info_df_1_5.parquet").to_pylist()
    # subgraph 0: the star 0-1, 0-2, 0-3 plus 2-3: 4 of 6 edges, degrees (3, 1, 2, 2), clustering (1/3, 0, 1, 1)
    assert table[0]["density"] == pytest.approx(4 / 6)
    assert table[0]["max_avg_degree_ratio"] == pytest.approx(3 / 2)
    assert table[0]["avg_clustering"] == pytest.approx((1 / 3 + 0 + 1 + 1) / 4)
    assert table[0]["diameter"] == 2.0
    assert table[5]["density"] == 1.0 and "top_10_tokens" not in table[5]
    assert table[5]["neuronpedia_link"] == table[5]["quicklist_link"] == ""  # no Neuronpedia id
    with open(tmp_path / "dataframes" / "node_info_df_1_5.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    links = ("neuronpedia_link", "quicklist_link")
    for row, want in zip(rows, table, strict=True):
        assert {k: float(v) for k, v in row.items() if k not in links} == pytest.approx(
            {k: float(v) for k, v in want.items() if k not in links}
        )


def test_partners_and_node_table_read_back(tmp_path):
    subs = subgraphs(STAR, 0.2)
    partners = top_cooccurring(STAR, 3)
    graphs = graph_results(subs, 1.5, EdgeThreshold(0.25, 4, True), ACTS, 8, partners=partners)
    save_graphs(tmp_path, graphs)
    back = load_partners(partners_path(tmp_path, 1.5))
    assert np.array_equal(back.latents, partners.latents) and np.array_equal(back.jaccard, partners.jaccard)
    assert back.latents.dtype == np.int64 and back.jaccard.dtype == np.float32
    table = read_node_table(tmp_path, 1.5, ["node_id", "subgraph_id", "subgraph_size"])
    assert table == {
        "node_id": [r["node_id"] for r in graphs.node_table],
        "subgraph_id": [r["subgraph_id"] for r in graphs.node_table],
        "subgraph_size": [r["subgraph_size"] for r in graphs.node_table],
    }
    without = save_graphs(tmp_path / "none", graph_results(subs, 1.5, EdgeThreshold(0.25, 4, True), ACTS, 8))
    assert not partners_path(tmp_path / "none", 1.5).exists() and "histogram" in without


def test_histogram_and_skip_flags(tmp_path):
    subs = subgraphs(STAR, 0.2)
    graphs = graph_results(subs, 0.0, EdgeThreshold(0.25, 4, True), ACTS, 8)
    result = save_graphs(tmp_path, graphs, skip_subgraph_files=True)
    assert result["histogram"] == str(tmp_path / "subgraph_sizes_0_0.png")
    assert not (tmp_path / "subgraph_objects").exists()
    image = imread(tmp_path / "subgraph_sizes_0_0.png")
    assert image.shape == (400, 700, 4)
    assert (image[..., :3] < 0.9).any()  # something is drawn
    assert (tmp_path / "dataframes" / "node_info_df_0_0.parquet").is_file()


def test_neuronpedia_id_round_trips_through_cfg_json(tmp_path):
    cfg = SAEConfig(12, 48, neuronpedia_id="gpt2-small/0-res-jb")
    sae = SAE(cfg)
    sae.load_state_dict(random_weights(12, 48, 0))
    sae.save(tmp_path / "with")
    written = json.loads((tmp_path / "with" / "cfg.json").read_text())
    assert written["metadata"]["neuronpedia_id"] == "gpt2-small/0-res-jb"
    assert load_sae(tmp_path / "with").cfg.neuronpedia_id == "gpt2-small/0-res-jb"
    plain = SAE(SAEConfig(12, 48))
    plain.load_state_dict(random_weights(12, 48, 0))
    plain.save(tmp_path / "without")
    assert "neuronpedia_id" not in json.loads((tmp_path / "without" / "cfg.json").read_text())["metadata"]
    assert load_sae(tmp_path / "without").cfg.neuronpedia_id is None
    # SAELens before 6 kept it at the top level of cfg.json
    flat = {k: v for k, v in written.items() if k != "metadata"}
    flat.update(neuronpedia_id="gpt2-small/8-res-jb", model_name="gpt2-small", hook_point="blocks.8.hook_resid_pre")
    (tmp_path / "with" / "cfg.json").write_text(json.dumps(flat))
    assert load_sae(tmp_path / "with").cfg.neuronpedia_id == "gpt2-small/8-res-jb"
    flat["neuronpedia_id"] = ""  # as some published configs have it: no id
    (tmp_path / "with" / "cfg.json").write_text(json.dumps(flat))
    assert load_sae(tmp_path / "with").cfg.neuronpedia_id is None
    with pytest.raises(ValueError, match="neuronpedia_id"):
        SAEConfig(12, 48, neuronpedia_id="")
