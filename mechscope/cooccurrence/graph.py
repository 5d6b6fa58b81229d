"""Thresholded Jaccard graphs of SAE latents: the edge threshold, subgraphs, node table and summary (computed here,
written by :mod:`mechscope.cooccurrence.outputs`).

The graph has one node per latent and an edge ``i - j`` (``i != j``) of weight ``J_ij`` when ``J_ij >= threshold``
and ``J_ij > 0``. Subgraphs are its connected components.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from mechscope.cooccurrence.links import neuronpedia_link, quicklist_link
from mechscope.cooccurrence.records import Partners
from mechscope.sae.tokens import LatentTokens

QUICKLIST_SIZE = 10  # latents per quick-list link, as in the reference
METRICS = (  # graph_metrics' keys, in the reference's column order
    "density",
    "max_avg_degree_ratio",
    "avg_clustering",
    "diameter",
    "single_node_score",
    "hub_spoke_score",
    "strongly_connected_score",
    "linear_score",
)


@dataclass(frozen=True)
class EdgeThreshold:
    """The chosen edge threshold, the size of the largest subgraph it gives, and whether that reaches min_size."""

    threshold: float
    largest_size: int
    reaches_min_size: bool


def _edges(jaccard: sp.sparray | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(i, j, weight, n_nodes)`` of the positive off-diagonal entries with ``i < j``, from a symmetric matrix."""
    m = sp.coo_array(jaccard)
    upper = (m.row < m.col) & (m.data > 0)
    return m.row[upper].astype(np.int64), m.col[upper].astype(np.int64), m.data[upper], m.shape[0]


def components(jaccard: sp.sparray | np.ndarray, threshold: float) -> np.ndarray:
    """``[n_nodes]`` subgraph id of every latent at ``threshold``, ids ordered by each subgraph's smallest latent."""
    i, j, w, n = _edges(jaccard)
    keep = w >= threshold
    graph = sp.csr_array((np.ones(int(keep.sum())), (i[keep], j[keep])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # first[label] = smallest latent with that label
    order = np.empty_like(first)
    order[np.argsort(first)] = np.arange(len(first))
    return order[labels]


def largest_component_size(jaccard: sp.sparray | np.ndarray, threshold: float) -> int:
    """Nodes in the largest connected component of the graph with edges ``J_ij >= threshold`` (and ``J_ij > 0``)."""
    m = sp.csr_array(jaccard)
    graph = m >= threshold if threshold > 0 else m > 0
    _, labels = connected_components(graph, directed=False)
    return int(np.bincount(labels).max())


class _Forest:
    """Union-find over ``n`` nodes with union by size and path halving."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union_all(self, a_list: list[int], b_list: list[int]) -> list[int]:
        """Join each pair ``(a, b)``; return the sizes of the components that grew."""
        grown = []
        for a, b in zip(a_list, b_list, strict=True):
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                continue
            if self.size[ra] < self.size[rb]:
                ra, rb = rb, ra
            self.parent[rb] = ra
            self.size[ra] += self.size[rb]
            grown.append(self.size[ra])
        return grown


def edge_threshold(
    jaccard: sp.sparray | np.ndarray,
    min_size: int = 150,
    max_size: int = 200,
    method: str = "exact",
    tolerance: float = 1e-3,
) -> EdgeThreshold:
    """Choose the edge threshold for a Jaccard matrix ``[d_sae, d_sae]``.

    ``"exact"``: the smallest threshold whose largest connected component has at most ``max_size`` nodes, in one
    pass: union-find over the edges in descending weight, one weight level at a time, stopping at the first level
    whose edges would make a component larger than ``max_size``; the answer is the last level kept. When the
    heaviest level alone is too big, the answer is just above it (no edges). Without edges it is 1.0.

    ``"bisection"``: the reference's binary search on ``[0, 1]`` down to ``tolerance``: it stops at the first
    midpoint whose largest component is within ``[min_size, max_size]``, else returns the midpoint whose size was
    closest to ``(min_size + max_size) / 2``. It answers a different question (some threshold in the window, not
    the smallest) and is kept for comparison.
    """
    if method == "bisection":
        return _bisection(jaccard, min_size, max_size, tolerance)
    if method != "exact":
        raise ValueError(f"method must be 'exact' or 'bisection', not {method!r}")
    i, j, w, n = _edges(jaccard)
    if len(w) == 0:
        return EdgeThreshold(1.0, 1, min_size <= 1)
    forest = _Forest(n)
    largest, chosen, upper, lowest, take = 1, None, math.inf, float(w.min()), 1024
    with tqdm(total=len(w), desc="edge threshold", unit="edge", leave=False) as progress:
        while upper > lowest:  # rounds of ever more of the heaviest edges, always in complete weight levels
            take = min(2 * take, len(w))
            cut = float(np.partition(w, len(w) - take)[len(w) - take])
            batch = np.flatnonzero((w >= cut) & (w < upper))
            if len(batch) == 0:
                continue
            batch = batch[np.argsort(-w[batch], kind="stable")]
            bw, a_list, b_list = w[batch], i[batch].tolist(), j[batch].tolist()
            starts = [*np.flatnonzero(np.r_[True, bw[1:] != bw[:-1]]).tolist(), len(bw)]
            for start, stop in itertools.pairwise(starts):
                level_largest = max([largest, *forest.union_all(a_list[start:stop], b_list[start:stop])])
                if level_largest > max_size:
                    upper = -math.inf  # stop: this level is one too many
                    break
                largest, chosen = level_largest, float(bw[start])
            else:
                upper = cut
            progress.update(len(batch))
    if chosen is None:
        warnings.warn(
            f"the heaviest edges (J = {float(w.max())}) already join more than max_size={max_size} latents; "
            "using a threshold just above them (no edges)",
            stacklevel=2,
        )
        top = w.max()  # the next weight up in the matrix's own dtype, so that `w >= chosen` keeps no edge
        chosen = float(np.nextafter(top, np.array(np.inf, dtype=top.dtype)))
    return EdgeThreshold(chosen, largest, largest >= min_size)


def _bisection(jaccard: sp.sparray | np.ndarray, min_size: int, max_size: int, tolerance: float) -> EdgeThreshold:
    low, high = 0.0, 1.0
    best: tuple[float, int] | None = None
    target = (min_size + max_size) / 2
    while high - low > tolerance:
        mid = (low + high) / 2
        size = largest_component_size(jaccard, mid)
        if min_size <= size <= max_size:
            return EdgeThreshold(mid, size, True)
        if size < min_size:
            high = mid
        else:
            low = mid
        if best is None or abs(size - target) < abs(best[1] - target):
            best = (mid, size)
    if best is None:
        raise ValueError(f"tolerance {tolerance} leaves nothing to search in [0, 1]")
    return EdgeThreshold(best[0], best[1], best[1] >= min_size)


@dataclass
class Subgraph:
    """One connected component: its latents (ascending), and its edges ``(i, j)`` with ``i < j`` and weights."""

    id: int
    nodes: list[int]
    edges: list[tuple[int, int]]
    weights: list[float]

    def to_networkx(self) -> nx.Graph:
        """The subgraph as a weighted ``networkx.Graph``."""
        g = nx.Graph()
        g.add_nodes_from(self.nodes)
        g.add_weighted_edges_from((a, b, w) for (a, b), w in zip(self.edges, self.weights, strict=True))
        return g


def subgraphs(jaccard: sp.sparray | np.ndarray, threshold: float) -> list[Subgraph]:
    """All subgraphs at ``threshold`` (singletons included), ``result[k].id == k``, ordered by smallest latent."""
    labels = components(jaccard, threshold)
    i, j, w, _ = _edges(jaccard)
    keep = w >= threshold
    i, j, w = i[keep], j[keep], w[keep]
    nodes_by = np.argsort(labels, kind="stable")
    node_bounds = np.searchsorted(labels[nodes_by], np.arange(labels.max() + 2))
    edge_order = np.lexsort((j, i, labels[i]))
    i, j, w = i[edge_order], j[edge_order], w[edge_order]
    edge_bounds = np.searchsorted(labels[i], np.arange(labels.max() + 2))
    out = []
    for k in range(labels.max() + 1):
        es = slice(edge_bounds[k], edge_bounds[k + 1])
        out.append(
            Subgraph(
                k,
                nodes_by[node_bounds[k] : node_bounds[k + 1]].tolist(),
                list(zip(i[es].tolist(), j[es].tolist(), strict=True)),
                [float(x) for x in w[es]],
            )
        )
    return out


def graph_metrics(sub: Subgraph) -> dict[str, float]:
    """Shape of one subgraph: density, max_avg_degree_ratio (max degree / mean degree), avg_clustering, diameter,
    and the reference's structure scores (single_node, hub_spoke, strongly_connected and linear scores), keyed in
    the order of :data:`METRICS`.

    A structure score is ``1 - d_k / (d_hub + d_strong + d_linear)``, with ``d_k`` the Euclidean distance from
    ``(density, min(max_avg_degree_ratio, n - 1), avg_clustering, diameter)`` to the reference's ideal vector of
    structure ``k`` for ``n`` nodes: hub-spoke ``(2/n, n-1, 0, 2)``, strongly connected ``(1, 1, 1, 1)``, linear
    ``(2/(n-1), 2, 0, n-1)``. A single latent scores 1 as single node and 0 otherwise.
    """
    n = len(sub.nodes)
    if n == 1:
        return {**dict.fromkeys(METRICS, 0.0), "single_node_score": 1.0}
    g = sub.to_networkx()
    degrees = [d for _, d in g.degree()]
    metrics = {
        "density": nx.density(g),
        "max_avg_degree_ratio": max(degrees) / (sum(degrees) / n),
        "avg_clustering": nx.average_clustering(g),
        "diameter": float(nx.diameter(g)),
    }
    ratio = min(metrics["max_avg_degree_ratio"], n - 1)
    point = np.array([metrics["density"], ratio, metrics["avg_clustering"], metrics["diameter"]])
    ideals = {
        "hub_spoke_score": [2 / n, n - 1, 0, 2],
        "strongly_connected_score": [1, 1, 1, 1],
        "linear_score": [2 / (n - 1), 2, 0, n - 1],
    }
    distances = {k: float(np.linalg.norm(point - np.array(v))) for k, v in ideals.items()}
    total = sum(distances.values())
    scores = {k: (1 - d / total if total > 0 else 1 / 3) for k, d in distances.items()}
    return {**metrics, "single_node_score": 0.0, **scores}


def node_table(
    subs: list[Subgraph],
    activity_threshold: float,
    feature_activations: np.ndarray,
    include_metrics: bool = False,
    tokens: LatentTokens | None = None,
    neuronpedia_id: str | None = None,
) -> list[dict[str, Any]]:
    """One row per latent, by subgraph then latent, with the reference's columns in its order, then mechscope's:

    ``node_id``, ``activity_threshold``, ``subgraph_id``, ``subgraph_size``, ``feature_activations`` (tokens on which
    it is active; ``[d_sae]`` input); with ``tokens`` its ``top_10_tokens`` (``tokens.top_input``);
    ``neuronpedia_link``; the graph metrics of its subgraph (:data:`METRICS`) if asked; ``quicklist_link`` (a
    Neuronpedia quick list of its subgraph's latents, :data:`QUICKLIST_SIZE` at a time); and with ``tokens``
    ``top_output_tokens``. Without ``neuronpedia_id`` the two links are ``""``, as the reference writes them.
    """
    if tokens is not None and not len(tokens.top_input) == len(tokens.top_output) == len(feature_activations):
        raise ValueError(
            f"tokens cover {len(tokens.top_input)} / {len(tokens.top_output)} latents, "
            f"feature_activations {len(feature_activations)}"
        )
    rows = []
    for sub in tqdm(subs, desc="node table", leave=False):
        metrics = graph_metrics(sub) if include_metrics else {}
        for start in range(0, len(sub.nodes), QUICKLIST_SIZE):
            batch = sub.nodes[start : start + QUICKLIST_SIZE]
            quicklist = quicklist_link(neuronpedia_id, batch) if neuronpedia_id else ""
            for node in batch:
                row: dict[str, Any] = {
                    "node_id": node,
                    "activity_threshold": activity_threshold,
                    "subgraph_id": sub.id,
                    "subgraph_size": len(sub.nodes),
                    "feature_activations": feature_activations[node].item(),
                }
                if tokens is not None:
                    row["top_10_tokens"] = tokens.top_input[node]
                row["neuronpedia_link"] = neuronpedia_link(neuronpedia_id, node) if neuronpedia_id else ""
                row.update(metrics)
                row["quicklist_link"] = quicklist
                if tokens is not None:
                    row["top_output_tokens"] = tokens.top_output[node]
                rows.append(row)
    return rows


def summary(subs: list[Subgraph], n_tokens: int, feature_activations: np.ndarray) -> dict[str, float | int]:
    """Share of latents in subgraphs of more than one latent, the largest subgraph, the number and mean size of
    subgraphs of more than one latent, and the mean number of active latents per token."""
    sizes = np.array([len(s.nodes) for s in subs])
    big = sizes[sizes > 1]
    return {
        "n_latents": int(sizes.sum()),
        "share_in_subgraphs": float(big.sum() / sizes.sum()),
        "largest_subgraph": int(sizes.max()),
        "n_subgraphs": len(big),
        "mean_subgraph_size": float(big.mean()) if len(big) else 0.0,
        "mean_active_per_token": float(np.sum(feature_activations) / n_tokens) if n_tokens else 0.0,
    }


def top_cooccurring(jaccard: sp.sparray | np.ndarray, n: int = 10) -> Partners:
    """The ``n`` latents with the largest Jaccard index to each latent (itself and Jaccard 0 left out), from the
    ``[d_sae, d_sae]`` matrix, dense or sparse: one sort of its non-zero entries, no dense copy of a sparse one."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    m = sp.coo_array(jaccard)
    keep = (m.row != m.col) & (m.data > 0)
    row, col, value = m.row[keep].astype(np.int64), m.col[keep].astype(np.int64), m.data[keep]
    order = np.lexsort((col, -value, row))  # by row, then Jaccard descending, then partner index
    row, col, value = row[order], col[order], value[order]
    starts = np.searchsorted(row, np.arange(m.shape[0]))
    rank = np.arange(len(row)) - starts[row]
    top = rank < n
    latents = np.full((m.shape[0], n), -1, dtype=np.int64)
    values = np.zeros((m.shape[0], n), dtype=np.float32)
    latents[row[top], rank[top]] = col[top]
    values[row[top], rank[top]] = value[top]
    return Partners(latents, values)


@dataclass
class GraphResults:
    """The graph stage at one activity threshold, as :func:`~mechscope.cooccurrence.outputs.save_graphs` writes it.

    ``subgraphs``: every subgraph (singletons included); ``feature_activations [d_sae]``: tokens on which each
    latent is active; ``node_table``: the :func:`node_table` rows; ``summary``: ``activity_threshold``,
    ``edge_threshold``, ``reaches_min_size``, ``n_tokens`` and the :func:`summary` figures; ``partners``: each
    latent's most co-occurring latents (:func:`top_cooccurring`; None: not computed).
    """

    activity_threshold: float
    subgraphs: list[Subgraph]
    feature_activations: np.ndarray
    node_table: list[dict[str, Any]]
    summary: dict[str, Any]
    partners: Partners | None = None


def graph_results(
    subs: list[Subgraph],
    activity_threshold: float,
    edge: EdgeThreshold,
    feature_activations: np.ndarray,
    n_tokens: int,
    *,
    include_metrics: bool = False,
    tokens: LatentTokens | None = None,
    neuronpedia_id: str | None = None,
    partners: Partners | None = None,
) -> GraphResults:
    """The node table and summary of the subgraphs ``subs`` found at ``edge``, for one activity threshold.

    ``feature_activations`` is ``[d_sae]``; ``tokens`` (from ``latent_tokens``) and ``neuronpedia_id`` add the token
    and link columns to the node table; ``include_metrics`` adds the graph metrics; ``partners`` is carried along.
    """
    t = float(activity_threshold)
    rows = node_table(subs, t, feature_activations, include_metrics, tokens, neuronpedia_id)
    figures = {
        "activity_threshold": t,
        "edge_threshold": edge.threshold,
        "reaches_min_size": edge.reaches_min_size,
        "n_tokens": int(n_tokens),
        **summary(subs, n_tokens, feature_activations),
    }
    return GraphResults(t, subs, feature_activations, rows, figures, partners)
