"""The explorer's plotly figures, built from plain arrays (no Streamlit here)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import networkx as nx
import plotly.graph_objects as go


def histogram(edges: Sequence[float], counts: Sequence[int], title: str) -> go.Figure:
    """A bar per bin ``(edges[i], edges[i+1]]`` of height ``counts[i]``."""
    mids = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    widths = [b - a for a, b in itertools.pairwise(edges)]
    fig = go.Figure(go.Bar(x=mids, y=list(counts), width=widths, marker_color="#f08c00"))
    fig.update_layout(title=title, xaxis_title="activation", yaxis_title="tokens", height=260, margin=dict(t=40, b=40))
    return fig


def bars(
    labels: Sequence[str], values: Sequence[float], title: str, highlight: Sequence[bool] | None = None
) -> go.Figure:
    """Horizontal bars, one per label (top to bottom in order); ``highlight`` marks some in another colour."""
    colours = ["#1f5fbf" if h else "#f08c00" for h in (highlight or [False] * len(labels))]
    fig = go.Figure(go.Bar(x=list(values), y=list(labels), orientation="h", marker_color=colours))
    fig.update_layout(
        title=title, height=max(200, 24 * len(labels) + 80), margin=dict(t=40, b=30), yaxis_autorange="reversed"
    )
    return fig


def heatmap(z: Sequence[Sequence[float]], x: Sequence[str], y: Sequence[str], title: str) -> go.Figure:
    """``z[row][col]`` with column labels ``x`` and row labels ``y``."""
    fig = go.Figure(go.Heatmap(z=z, x=list(x), y=list(y), colorscale="Oranges"))
    fig.update_layout(title=title, height=max(260, 22 * len(y) + 100), margin=dict(t=40, b=40))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


GREY = ("outside", "none active")  # the scatter's grey categories: the most active latent is not the subgraph's


def category_order(category: str) -> tuple[bool, int, str]:
    """The order of the scatter's categories (its traces and legend): latents by index, the grey ones last."""
    return category in GREY, int(category) if category.isdigit() else 0, category


def scatter(
    x: Sequence[float],
    y: Sequence[float],
    colour: Sequence[str] | Sequence[float],
    hover: Sequence[str],
    xlabel: str,
    ylabel: str,
) -> go.Figure:
    """Points ``(x[i], y[i])``: coloured by category (strings: a latent index, or ``"outside"`` / ``"none active"``,
    grey) or by value (numbers)."""
    fig = go.Figure()
    if colour and isinstance(colour[0], str):
        for category in sorted({str(c) for c in colour}, key=category_order):
            idx = [i for i, c in enumerate(colour) if c == category]
            fig.add_trace(
                go.Scatter(
                    x=[x[i] for i in idx],
                    y=[y[i] for i in idx],
                    mode="markers",
                    name=category if category in GREY else f"latent {category}",
                    customdata=idx,
                    text=[hover[i] for i in idx],
                    hovertemplate="%{text}<extra></extra>",
                    marker=dict(size=7, color="#bbbbbb" if category in GREY else None),
                )
            )
    else:
        fig.add_trace(
            go.Scatter(
                x=list(x),
                y=list(y),
                mode="markers",
                customdata=list(range(len(x))),
                text=list(hover),
                hovertemplate="%{text}<extra></extra>",
                marker=dict(size=7, color=list(colour), colorscale="Oranges", showscale=True),
            )
        )
    fig.update_layout(
        xaxis_title=xlabel, yaxis_title=ylabel, height=520, margin=dict(t=30, b=40), legend_title="most active"
    )
    return fig


def graph(
    nodes: Sequence[int],
    edges: Sequence[Sequence[int]],
    weights: Sequence[float],
    values: dict[int, float] | None = None,
    density: dict[int, float] | None = None,
) -> go.Figure:
    """A subgraph drawn with a spring layout: edges thick by Jaccard weight, nodes coloured by ``values`` when
    given (e.g. activations at a clicked point) and sized by ``density`` (fraction of tokens where each fires)."""
    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_weighted_edges_from((a, b, w) for (a, b), w in zip(edges, weights, strict=True))
    pos = nx.spring_layout(g, seed=0, weight="weight")
    fig = go.Figure()
    for (a, b), w in zip(edges, weights, strict=True):
        fig.add_trace(
            go.Scatter(
                x=[pos[a][0], pos[b][0]],
                y=[pos[a][1], pos[b][1]],
                mode="lines",
                line=dict(width=1 + 6 * w, color="#999"),
                hoverinfo="skip",
                showlegend=False,
            )
        )
    colour = [values.get(n, 0.0) for n in nodes] if values else "#f08c00"
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in nodes],
            y=[pos[n][1] for n in nodes],
            mode="markers+text",
            text=[str(n) for n in nodes],
            textposition="top center",
            showlegend=False,
            hovertemplate="latent %{text}<extra></extra>",
            marker=dict(
                size=_node_sizes(nodes, density),
                color=colour,
                colorscale="Oranges",
                showscale=bool(values),
                line=dict(width=1, color="#333"),
            ),
        )
    )
    fig.update_layout(
        title="co-occurrence graph (edge width: Jaccard)",
        height=420,
        xaxis_visible=False,
        yaxis_visible=False,
        margin=dict(t=40, b=10),
    )
    return fig


def size_histogram(sizes: Sequence[int]) -> go.Figure:
    fig = go.Figure(go.Histogram(x=list(sizes), marker_color="#f08c00"))
    fig.update_layout(title="subgraph sizes", xaxis_title="latents", yaxis_title="subgraphs", height=260)
    return fig


def _node_sizes(nodes: Sequence[int], density: dict[int, float] | None) -> list[float] | float:
    if not density:
        return 18.0
    top = max(density.get(n, 0.0) for n in nodes) or 1.0
    return [10 + 22 * (density.get(n, 0.0) / top) ** 0.5 for n in nodes]
