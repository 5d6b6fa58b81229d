"""Graph-stage outputs: top tokens per latent, the CSV / Parquet node table, the subgraph HTML pages and their index,
the size histogram, and the SAE's Neuronpedia id."""

from __future__ import annotations

import csv
import json
import math
import re
from importlib import resources
from pathlib import Path

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
    embed_json,
    graph_results,
    index_page,
    latent_tokens,
    node_table,
    save_graphs,
    subgraph_data,
    subgraph_page,
    subgraphs,
)
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


def embedded(page: str) -> dict:
    """The JSON a page embeds, read back out of the HTML."""
    found = re.findall(r'<script type="application/json" id="graph-data">(.*?)</script>', page, flags=re.DOTALL)
    assert len(found) == 1
    return json.loads(found[0])


def test_node_table_parquet_and_csv_with_tokens_and_links(tmp_path):
    subs = subgraphs(STAR, 0.2)
    tokens = hostile_tokens(6)
    graphs = graph_results(
        subs, 2.0, EdgeThreshold(0.25, 4, True), ACTS, 8, tokens=tokens, neuronpedia_id="gpt2-small/0-res-jb"
    )
    result = save_graphs(tmp_path, graphs)
    expected = [
        {
            "node_id": node,
            "activity_threshold": 2.0,
            "subgraph_id": 0 if node < 4 else 1,
            "subgraph_size": 4 if node < 4 else 2,
            "feature_activations": int(ACTS[node]),
            "top_10_tokens": [HOSTILE[(node + j) % len(HOSTILE)] for j in range(3)],
            "top_output_tokens": [f" out{node}", HOSTILE[node % len(HOSTILE)]],
            "neuronpedia_link": f"https://www.neuronpedia.org/gpt2-small/0-res-jb/{node}",
        }
        for node in range(6)
    ]
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
        assert row["neuronpedia_link"] == want["neuronpedia_link"]
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
    assert table[5]["density"] == 1.0 and "top_10_tokens" not in table[5] and "neuronpedia_link" not in table[5]
    with open(tmp_path / "dataframes" / "node_info_df_1_5.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, want in zip(rows, table, strict=True):
        assert {k: float(v) for k, v in row.items()} == pytest.approx({k: float(v) for k, v in want.items()})


def test_html_pages_embed_the_subgraphs(tmp_path):
    subs = subgraphs(STAR, 0.2)
    tokens = hostile_tokens(6)
    graphs = graph_results(subs, 1.5, EdgeThreshold(0.25, 4, True), ACTS, 8, tokens=tokens, neuronpedia_id="np/1")
    result = save_graphs(tmp_path, graphs)
    pages = tmp_path / "subgraph_plots" / "activation_1_5"
    assert sorted(p.name for p in pages.iterdir()) == ["index.html", "subgraph_0.html"]  # size 2 < 4: no page
    data = embedded((pages / "subgraph_0.html").read_text(encoding="utf-8"))
    assert [n["id"] for n in data["nodes"]] == [0, 1, 2, 3]
    assert data["edges"] == [[0, 1, 0.5], [0, 2, 0.5], [0, 3, 0.5], [2, 3, 0.25]]
    assert (data["subgraph_id"], data["activity_threshold"]) == (0, 1.5)
    for node in data["nodes"]:
        i = node["id"]
        assert node["activations"] == ACTS[i]
        assert node["top_input"] == [HOSTILE[(i + j) % len(HOSTILE)] for j in range(3)]
        assert node["top_output"] == [f" out{i}", HOSTILE[i % len(HOSTILE)]]
        assert node["link"] == f"https://www.neuronpedia.org/np/1/{i}"
        assert -1.001 <= node["x"] <= 1.001 and -1.001 <= node["y"] <= 1.001
    xy = {(n["x"], n["y"]) for n in data["nodes"]}
    assert len(xy) == 4  # a real layout, not every node on one spot
    index = embedded((pages / "index.html").read_text(encoding="utf-8"))
    assert index["histogram"] == "../../subgraph_sizes_1_5.png"
    assert index["subgraphs"] == [
        {
            "id": 0,
            "size": 4,
            "n_edges": 4,
            "mean_weight": pytest.approx(1.75 / 4),
            "activations": 19,
            "top_tokens": tokens.top_input[0],
            "file": "subgraph_0.html",
        }
    ]
    assert result["html_index"] == str(pages / "index.html")
    plain = graph_results(subs, 1.5, EdgeThreshold(0.25, 4, True), ACTS, 8)
    again = save_graphs(tmp_path / "all", plain, min_subgraph_size_to_plot=2)
    pages = Path(again["html_index"]).parent
    assert sorted(p.name for p in pages.iterdir()) == ["index.html", "subgraph_0.html", "subgraph_1.html"]
    pair = embedded((pages / "subgraph_1.html").read_text(encoding="utf-8"))
    assert pair["edges"] == [[4, 5, pytest.approx(0.9)]]
    assert [(n["top_input"], n["link"]) for n in pair["nodes"]] == [([], None), ([], None)]


def test_hostile_tokens_stay_inside_the_json():
    sub = subgraphs(STAR, 0.2)[0]
    page = subgraph_page(subgraph_data(sub, ACTS, 1.5, hostile_tokens(6), neuronpedia_id='x"><script>'))
    assert page.count("<script") == page.count("</script>") == 2  # the data element and the renderer only
    for bad in ("<!--", "<b>", "alert(1)</", "&amp;", 'x"><'):
        assert bad not in page
    data = embedded(page)
    assert data["nodes"][0]["top_input"] == HOSTILE[:3]
    assert {t for n in data["nodes"] for t in n["top_input"]} == set(HOSTILE[:6])
    assert data["nodes"][0]["link"] == 'https://www.neuronpedia.org/x"><script>/0'
    assert "innerHTML" not in page and "document.write" not in page
    urls = re.findall(r"https?://\S*", page)  # offline: the only URLs are the data's Neuronpedia links
    assert len(urls) == 4 and all(u.startswith("https://www.neuronpedia.org/") for u in urls)


def template(name: str) -> str:
    return (resources.files("mechscope.cooccurrence") / "templates" / name).read_text(encoding="utf-8")


def test_pages_are_the_template_files_with_the_title_and_the_json_filled_in():
    """A plain reference: the files joined by hand, the escaped title and ``embed_json`` of the data put in."""
    sub = subgraphs(STAR, 0.2)[0]
    data = subgraph_data(sub, ACTS, 1.5, hostile_tokens(6), neuronpedia_id="np/1")
    for page, kind, title, shown in (
        (subgraph_page(data), "subgraph", "Subgraph 0: 4 latents (activity threshold 1.5)", data),
        (index_page([], 0.5, None), "index", "Latent subgraphs at activity threshold 0.5", None),
    ):
        shown = shown or {"activity_threshold": 0.5, "histogram": None, "subgraphs": []}
        head, tail = template("page.html").split("__BODY__")
        expected = (
            head.replace("__TITLE__", title).replace("__STYLE__\n", template("page.css"))
            + template(f"{kind}_body.html").removesuffix("\n")
            + tail.replace("__DATA__", embed_json(shown))
            .replace("__COMMON__\n", template("common.js"))
            .replace("__SCRIPT__\n", template(f"{kind}.js"))
        )
        assert page == expected
        assert "__" not in page  # every placeholder filled


def test_histogram_and_skip_flags(tmp_path):
    subs = subgraphs(STAR, 0.2)
    graphs = graph_results(subs, 0.0, EdgeThreshold(0.25, 4, True), ACTS, 8)
    result = save_graphs(tmp_path, graphs, skip_subgraph_plots=True, skip_subgraph_files=True)
    assert result["html_index"] is None
    assert not (tmp_path / "subgraph_plots").exists() and not (tmp_path / "subgraph_objects").exists()
    image = imread(tmp_path / "subgraph_sizes_0_0.png")
    assert image.shape == (400, 700, 4)
    assert (image[..., :3] < 0.9).any()  # something is drawn
    assert (tmp_path / "dataframes" / "node_info_df_0_0.parquet").is_file()


def test_layout_is_deterministic_for_big_subgraphs():
    rng = np.random.default_rng(3)
    n = 80  # above the Kamada-Kawai limit: the seeded spring layout
    upper = np.triu(rng.random((n, n)) < 0.2, k=1) * rng.random((n, n))
    sub = max(subgraphs(sp.csr_array(upper + upper.T + np.eye(n)), 0.01), key=lambda s: len(s.nodes))
    assert len(sub.nodes) == n
    acts = np.arange(n)
    first, second = subgraph_data(sub, acts, 1.0), subgraph_data(sub, acts, 1.0)
    assert first == second
    assert all(math.isfinite(v["x"]) and math.isfinite(v["y"]) for v in first["nodes"])
    assert len(first["edges"]) == len(sub.edges)


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
