"""The explorer's plotly figures, built from plain arrays (no Streamlit here)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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
