"""Edge threshold (exact and bisection), subgraphs, node table and summary against hand-made graphs and networkx."""

from __future__ import annotations

import csv
import json
import math

import networkx as nx
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from mechscope.cooccurrence import (
    count_cooccurrences,
    edge_threshold,
    graph_metrics,
    graph_results,
    jaccard,
    largest_component_size,
    load_counts,
    node_table,
    save_counts,
    save_graphs,
    subgraphs,
    summary,
    top_cooccurring,
)
from mechscope.cooccurrence.layout import load_graph_summary, load_subgraph


def symmetric(n: int, edges: dict[tuple[int, int], float]) -> sp.csr_array:
    """A Jaccard-like matrix: 1 on the diagonal, the given weights on both sides."""
    m = np.eye(n, dtype=np.float32)
    for (a, b), w in edges.items():
        m[a, b] = m[b, a] = w
    return sp.csr_array(m)


CHAIN = symmetric(7, {(0, 1): 0.9, (1, 2): 0.8, (3, 4): 0.7, (2, 3): 0.5, (4, 5): 0.3})


def random_jaccard(seed: int, n: int = 60, density: float = 0.08) -> sp.csr_array:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < density, k=1) * np.round(rng.random((n, n)), 3)
    return sp.csr_array((upper + upper.T + np.eye(n)).astype(np.float32))


def nx_largest(matrix: sp.csr_array, t: float) -> int:
    """Largest component with networkx, independently of mechscope's own component code."""
    m = matrix.toarray()
    g = nx.Graph()
    g.add_nodes_from(range(len(m)))
    g.add_edges_from((a, b) for a in range(len(m)) for b in range(a + 1, len(m)) if m[a, b] > 0 and m[a, b] >= t)
    return max(len(c) for c in nx.connected_components(g))


def test_exact_threshold_on_a_hand_made_chain():
    assert edge_threshold(CHAIN, min_size=3, max_size=3).threshold == pytest.approx(0.7)
    result = edge_threshold(CHAIN, min_size=4, max_size=3)
    assert (result.largest_size, result.reaches_min_size) == (3, False)
    assert edge_threshold(CHAIN, min_size=2, max_size=5).threshold == pytest.approx(0.5)
    assert edge_threshold(CHAIN, min_size=2, max_size=2).threshold == pytest.approx(0.9)
    everything = edge_threshold(CHAIN, min_size=1, max_size=100)
    assert (everything.threshold, everything.largest_size) == (pytest.approx(0.3), 6)


def test_exact_threshold_when_even_the_heaviest_edges_are_too_many():
    clique = symmetric(4, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0})
    with pytest.warns(UserWarning, match="heaviest edges"):
        result = edge_threshold(clique, min_size=1, max_size=3)
    assert result.threshold > 1.0 and result.largest_size == 1
    assert nx_largest(clique, result.threshold) == 1  # no edge survives, in the matrix's own float32
    assert [len(s.nodes) for s in subgraphs(clique, result.threshold)] == [1, 1, 1, 1]
    assert edge_threshold(sp.csr_array(np.eye(5))).threshold == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_exact_threshold_is_the_smallest_that_fits(seed):
    matrix = random_jaccard(seed)
    levels = np.unique(sp.triu(matrix, k=1).data)
    max_size = 8
    result = edge_threshold(matrix, min_size=5, max_size=max_size)
    assert result.largest_size == nx_largest(matrix, result.threshold) <= max_size
    lower = levels[levels < result.threshold]
    if len(lower):  # the next weight level down is already too big
        assert nx_largest(matrix, lower.max()) > max_size
    assert result.reaches_min_size == (result.largest_size >= 5)
    bisected = edge_threshold(matrix, min_size=5, max_size=max_size, method="bisection")
    if bisected.largest_size <= max_size and len(lower):  # an accepted threshold keeps out the too-big level
        assert bisected.threshold > lower.max()


def test_bisection_agrees_with_exact_within_tolerance():
    # the largest component is within [3, 3] only on a narrow band of thresholds, as in a real search
    matrix = symmetric(6, {(0, 1): 0.6009, (1, 2): 0.6005, (2, 3): 0.6, (3, 4): 0.6})
    exact = edge_threshold(matrix, min_size=3, max_size=3)
    bisected = edge_threshold(matrix, min_size=3, max_size=3, method="bisection")
    assert exact.threshold == pytest.approx(0.6005) and exact.largest_size == 3
    assert abs(bisected.threshold - exact.threshold) <= 1e-3
    assert largest_component_size(matrix, 0.6005) == 3


def test_subgraphs_have_deterministic_ids_and_match_networkx():
    matrix = random_jaccard(7, n=40, density=0.06)
    t = 0.4
    subs = subgraphs(matrix, t)
    assert [s.id for s in subs] == list(range(len(subs)))
    assert [s.nodes[0] for s in subs] == sorted(s.nodes[0] for s in subs)  # ordered by smallest latent
    assert sorted(n for s in subs for n in s.nodes) == list(range(40))
    m = matrix.toarray()
    g = nx.Graph()
    g.add_nodes_from(range(40))
    g.add_edges_from((a, b) for a in range(40) for b in range(a + 1, 40) if m[a, b] >= t)
    expected = sorted(sorted(c) for c in nx.connected_components(g))
    assert [s.nodes for s in subs] == expected
    for s in subs:
        assert sorted(s.edges) == sorted(tuple(sorted(e)) for e in g.subgraph(s.nodes).edges())
        assert all(a < b for a, b in s.edges)
        assert s.weights == [pytest.approx(float(m[a, b])) for a, b in s.edges]


def test_metrics_node_table_and_summary(tmp_path):
    star = symmetric(6, {(0, 1): 0.5, (0, 2): 0.5, (0, 3): 0.5, (4, 5): 0.9})
    subs = subgraphs(star, 0.4)
    assert [s.nodes for s in subs] == [[0, 1, 2, 3], [4, 5]]
    m = graph_metrics(subs[0])
    assert m["density"] == pytest.approx(3 / 6)
    assert m["max_avg_degree_ratio"] == pytest.approx(3 / 1.5)
    assert (m["avg_clustering"], m["diameter"]) == (0.0, 2.0)
    # distances of (0.5, 2, 0, 2) to the reference's ideals for 4 nodes: hub (0.5, 3, 0, 2), strong (1, 1, 1, 1),
    # linear (2/3, 2, 0, 3)
    hub, strong, linear = 1.0, math.sqrt(0.25 + 3), math.sqrt(1 / 36 + 1)
    total = hub + strong + linear
    assert m["hub_spoke_score"] == pytest.approx(1 - hub / total)
    assert m["strongly_connected_score"] == pytest.approx(1 - strong / total)
    assert m["linear_score"] == pytest.approx(1 - linear / total)
    assert m["single_node_score"] == 0.0
    assert graph_metrics(subgraphs(star, 0.95)[0])["single_node_score"] == 1.0
    acts = np.array([10, 4, 3, 2, 7, 7])
    rows = node_table(subs, 1.5, acts, include_metrics=True)
    assert [r["node_id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[4] == {
        "node_id": 4,
        "activity_threshold": 1.5,
        "subgraph_id": 1,
        "subgraph_size": 2,
        "feature_activations": 7,
        "neuronpedia_link": "",  # no Neuronpedia id: empty links, as the reference writes them
        "density": 1.0,
        "max_avg_degree_ratio": 1.0,
        "avg_clustering": 0.0,
        "diameter": 1.0,
        "single_node_score": 0.0,
        # a pair: hub (1, 1, 0, 2), strong (1, 1, 1, 1), linear (2, 2, 0, 1) from (1, 1, 0, 1)
        "hub_spoke_score": pytest.approx(1 - 1 / (2 + math.sqrt(2))),
        "strongly_connected_score": pytest.approx(1 - 1 / (2 + math.sqrt(2))),
        "linear_score": pytest.approx(1 - math.sqrt(2) / (2 + math.sqrt(2))),
        "quicklist_link": "",
    }
    assert list(rows[4]) == list(rows[0])  # the same columns in the same order for singletons and the rest
    s = summary(
        subgraphs(symmetric(7, {(0, 1): 0.5, (0, 2): 0.5, (4, 5): 0.9}), 0.4), n_tokens=4, feature_activations=acts
    )
    assert s == {
        "n_latents": 7,
        "share_in_subgraphs": pytest.approx(5 / 7),
        "largest_subgraph": 3,
        "n_subgraphs": 2,
        "mean_subgraph_size": 2.5,
        "mean_active_per_token": pytest.approx(33 / 4),
    }
    edge = edge_threshold(star, min_size=2, max_size=4)
    result = save_graphs(tmp_path, graph_results(subs, 1.5, edge, acts, n_tokens=4, include_metrics=True))
    assert result["edge_threshold"] == pytest.approx(0.5) and result["largest_subgraph"] == 4
    record = json.loads((tmp_path / "subgraph_objects" / "activation_1_5" / "subgraph_1.json").read_text())
    assert record == {"id": 1, "nodes": [4, 5], "edges": [[4, 5]], "weights": [pytest.approx(0.9)]}
    assert load_subgraph(tmp_path, 1.5, 1) == record  # the reader of that file
    assert load_graph_summary(tmp_path, 1.5) == result
    with open(tmp_path / "dataframes" / "node_info_df_1_5.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["subgraph_size"]) for r in table] == [4, 4, 4, 4, 2, 2]
    assert json.loads((tmp_path / "graph_summary_1_5.json").read_text())["n_subgraphs"] == 2


@pytest.mark.parametrize("max_size", [12, 40, 200, 400])
def test_exact_threshold_with_many_edges_and_ties(max_size):
    # ~8000 edges on 100 weight levels of ~80 tied edges each: the search runs several rounds
    rng = np.random.default_rng(max_size)
    n = 400
    upper = np.triu(rng.random((n, n)) < 0.1, k=1) * np.ceil(rng.random((n, n)) * 100) / 100
    matrix = sp.csr_array(upper + upper.T + np.eye(n))
    result = edge_threshold(matrix, min_size=1, max_size=max_size)
    sizes = {t: largest_component_size(matrix, t) for t in np.arange(1, 101) / 100}
    fitting = [t for t, size in sizes.items() if size <= max_size]
    assert result.threshold == pytest.approx(min(fitting))
    assert result.largest_size == sizes[min(fitting)] == nx_largest(matrix, result.threshold)


def test_counts_to_graphs_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    # 3 planted groups of latents that fire together, plus noise: each group must come out as one subgraph
    groups = [[2, 5, 11], [20, 21], [7, 30, 31, 33]]
    acts = np.zeros((500, 40), dtype=np.float32)
    for row in acts:
        for g in groups:
            if rng.random() < 0.2:
                row[g] = 1.0
        row[rng.integers(0, 40, size=2)] += 0.5
    counts = count_cooccurrences([torch.from_numpy(acts)], [0.75])
    save_counts(tmp_path, counts)
    c = load_counts(tmp_path, 0.75)
    edge = edge_threshold(jaccard(c), min_size=2, max_size=4)
    subs = [s for s in subgraphs(jaccard(c), edge.threshold) if len(s.nodes) > 1]
    assert [s.nodes for s in subs] == sorted(groups)
    result = save_graphs(
        tmp_path, graph_results(subgraphs(jaccard(c), edge.threshold), 0.75, edge, c.activations, c.n_tokens)
    )
    assert result["n_subgraphs"] == 3 and result["largest_subgraph"] == 4 and result["reaches_min_size"]
    assert result["mean_active_per_token"] == pytest.approx((acts > 0.75).sum() / 500)
    table = pq.read_table(tmp_path / "dataframes" / "node_info_df_0_75.parquet").to_pylist()
    with open(tmp_path / "dataframes" / "node_info_df_0_75.csv") as f:
        parsed = [{k: float(v) if v else v for k, v in row.items()} for row in csv.DictReader(f)]
    assert parsed == table
    in_group = {n: len(g) for g in groups for n in g}
    assert {r["node_id"]: r["subgraph_size"] for r in table if r["subgraph_size"] > 1} == in_group
    assert [r["feature_activations"] for r in sorted(table, key=lambda r: r["node_id"])] == (acts > 0.75).sum(
        0
    ).tolist()


def plain_top_cooccurring(matrix: np.ndarray, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's partners by a plain sort: Jaccard descending, then index; itself and zeros left out."""
    latents, values = [], []
    for i, row in enumerate(matrix):
        ranked = sorted((-v, j) for j, v in enumerate(row) if j != i and v > 0)[:n]
        latents.append([j for _, j in ranked] + [-1] * (n - len(ranked)))
        values.append([-v for v, _ in ranked] + [0.0] * (n - len(ranked)))
    return latents, values


@pytest.mark.parametrize("n", [1, 3, 50])
def test_top_cooccurring_matches_a_plain_sort_dense_and_sparse(n):
    rng = np.random.default_rng(n)
    d = 40
    upper = np.triu(np.round(rng.random((d, d)), 1) * (rng.random((d, d)) < 0.3), k=1)  # rounded: many ties
    matrix = (upper + upper.T + np.eye(d)).astype(np.float32)
    matrix[7] = matrix[:, 7] = 0  # a latent that never fired
    want_latents, want_values = plain_top_cooccurring(matrix, n)
    for given in (matrix, sp.csr_array(matrix)):
        got = top_cooccurring(given, n)
        assert got.latents.tolist() == want_latents
        assert np.array_equal(got.jaccard, np.array(want_values, dtype=np.float32))
    assert (top_cooccurring(matrix, n).latents[7] == -1).all()
    with pytest.raises(ValueError, match="at least 1"):
        top_cooccurring(matrix, 0)
