"""Offline HTML views of latent subgraphs and their index page, rendered to strings (written by
:func:`mechscope.cooccurrence.outputs.write_subgraph_pages`).

Every page is one self-contained file (no network, no third-party script): the graph is embedded as JSON in a
``<script type="application/json">`` element, with ``<``, ``>`` and ``&`` written as JSON ``\\u`` escapes so that no
token text can end the element or start markup, and a small inline script draws it on a canvas. The HTML, CSS and
JavaScript are package data (``templates/``: ``page.html`` with ``page.css`` and ``common.js``, and a body and a
script per kind of page); Python fills in only the title and the JSON. Node positions are
computed here (networkx: Kamada-Kawai up to ``KAMADA_KAWAI_MAX_NODES`` nodes, else a seeded spring layout weighted by
Jaccard), so a page always opens with the same picture.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib.resources import files
from typing import Any

import networkx as nx
import numpy as np
from tqdm.auto import tqdm

from mechscope.cooccurrence.graph import Subgraph, neuronpedia_link
from mechscope.sae.tokens import LatentTokens

__all__ = ["embed_json", "index_page", "layout", "neuronpedia_link", "subgraph_data", "subgraph_page", "subgraph_pages"]

KAMADA_KAWAI_MAX_NODES = 60


def layout(sub: Subgraph, seed: int = 0) -> dict[int, tuple[float, float]]:
    """``{latent: (x, y)}`` in ``[-1, 1]``: Kamada-Kawai (unweighted) for small subgraphs, else a spring layout
    whose attraction grows with the Jaccard weight, seeded so it is the same every time."""
    g = sub.to_networkx()
    if len(sub.nodes) == 1:
        return {sub.nodes[0]: (0.0, 0.0)}
    if len(sub.nodes) <= KAMADA_KAWAI_MAX_NODES:
        pos = nx.kamada_kawai_layout(g, weight=None)
    else:
        pos = nx.spring_layout(g, weight="weight", seed=seed, iterations=100)
    return {int(n): (round(float(x), 5), round(float(y), 5)) for n, (x, y) in pos.items()}


def subgraph_data(
    sub: Subgraph,
    feature_activations: np.ndarray,
    activity_threshold: float,
    tokens: LatentTokens | None = None,
    neuronpedia_id: str | None = None,
) -> dict[str, Any]:
    """What a subgraph page shows, as embedded in it: ``{"subgraph_id", "activity_threshold", "nodes", "edges"}``.

    ``nodes``: one ``{"id", "x", "y", "activations", "top_input", "top_output", "link"}`` per latent (ascending;
    token lists empty without ``tokens``, ``link`` None without ``neuronpedia_id``); ``edges``: ``[i, j, weight]``
    per edge, ``i < j`` latent ids. ``feature_activations`` is ``[d_sae]``.
    """
    pos = layout(sub)
    nodes = [
        {
            "id": n,
            "x": pos[n][0],
            "y": pos[n][1],
            "activations": int(feature_activations[n]),
            "top_input": tokens.top_input[n] if tokens else [],
            "top_output": tokens.top_output[n] if tokens else [],
            "link": neuronpedia_link(neuronpedia_id, n) if neuronpedia_id else None,
        }
        for n in sub.nodes
    ]
    edges = [[a, b, w] for (a, b), w in zip(sub.edges, sub.weights, strict=True)]
    return {"subgraph_id": sub.id, "activity_threshold": float(activity_threshold), "nodes": nodes, "edges": edges}


def embed_json(data: Any) -> str:
    """``data`` as JSON that is safe inside an HTML ``<script>`` element: ``<``, ``>``, ``&`` become ``\\u`` escapes
    (they only occur inside JSON strings, where the escapes mean the same characters)."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _template(name: str) -> str:
    """The text of ``templates/{name}`` (package data), without the newline that ends the file."""
    return files("mechscope.cooccurrence").joinpath("templates", name).read_text(encoding="utf-8").removesuffix("\n")


@cache
def _skeleton(kind: str) -> str:
    """The page of ``kind`` (``"subgraph"`` or ``"index"``): ``page.html`` with the style, the shared script and
    ``kind``'s body and script in place; ``__TITLE__`` and ``__DATA__`` are left to fill."""
    parts = {
        "__STYLE__": "page.css",
        "__COMMON__": "common.js",
        "__BODY__": f"{kind}_body.html",
        "__SCRIPT__": f"{kind}.js",
    }
    page = _template("page.html") + "\n"
    for placeholder, name in parts.items():
        page = page.replace(placeholder, _template(name))
    return page


def _page(kind: str, title: str, data: Any) -> str:
    """The page of ``kind`` titled ``title`` (HTML-escaped) with ``data`` embedded as JSON (:func:`embed_json`)."""
    return _skeleton(kind).replace("__TITLE__", html.escape(title)).replace("__DATA__", embed_json(data))


def subgraph_page(data: dict[str, Any]) -> str:
    """The interactive page of one subgraph, from ``subgraph_data(...)``: drag nodes, drag the background to pan,
    wheel to zoom, double-click to re-fit; hover or click a node for its latent, activation count, top tokens,
    strongest edges and Neuronpedia link. Node area grows with the activation count, edge width and opacity with
    the Jaccard weight."""
    title = f"Subgraph {data['subgraph_id']}: {len(data['nodes'])} latents"
    title += f" (activity threshold {data['activity_threshold']})"
    return _page("subgraph", title, data)


def index_page(entries: list[dict[str, Any]], activity_threshold: float, histogram: str | None) -> str:
    """The page listing the subgraph pages, sortable by each column. ``entries``: one ``{"id", "size", "n_edges",
    "mean_weight", "activations", "top_tokens", "file"}`` per page; ``histogram``: a relative path to the size
    histogram image, shown above the table."""
    data = {"activity_threshold": float(activity_threshold), "histogram": histogram, "subgraphs": entries}
    return _page("index", f"Latent subgraphs at activity threshold {activity_threshold}", data)


def subgraph_pages(
    subs: list[Subgraph],
    feature_activations: np.ndarray,
    activity_threshold: float,
    tokens: LatentTokens | None = None,
    neuronpedia_id: str | None = None,
    min_size: int = 4,
    histogram: str | None = None,
) -> dict[str, str]:
    """``{file name: page}``: ``subgraph_{id}.html`` for every subgraph of at least ``max(min_size, 2)`` latents,
    then ``index.html`` listing them, with the image at the relative path ``histogram`` on top (if given)."""
    pages, entries = {}, []
    for sub in tqdm(subs, desc="subgraph pages", leave=False):
        if len(sub.nodes) < max(min_size, 2):
            continue
        file = f"subgraph_{sub.id}.html"
        pages[file] = subgraph_page(subgraph_data(sub, feature_activations, activity_threshold, tokens, neuronpedia_id))
        strongest = max(sub.nodes, key=lambda n: (int(feature_activations[n]), -n))
        entries.append(
            {
                "id": sub.id,
                "size": len(sub.nodes),
                "n_edges": len(sub.edges),
                "mean_weight": float(np.mean(sub.weights)),
                "activations": int(np.sum(feature_activations[sub.nodes])),
                "top_tokens": tokens.top_input[strongest][:5] if tokens else [],
                "file": file,
            }
        )
    pages["index.html"] = index_page(entries, activity_threshold, histogram)
    return pages
