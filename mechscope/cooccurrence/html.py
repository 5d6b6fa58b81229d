"""Offline HTML views of latent subgraphs and their index page, rendered to strings (written by
:func:`mechscope.cooccurrence.outputs.write_subgraph_pages`).

Every page is one self-contained file (no network, no third-party script): the graph is embedded as JSON in a
``<script type="application/json">`` element, with ``<``, ``>`` and ``&`` written as JSON ``\\u`` escapes so that no
token text can end the element or start markup, and a small inline script draws it on a canvas. Node positions are
computed here (networkx: Kamada-Kawai up to ``KAMADA_KAWAI_MAX_NODES`` nodes, else a seeded spring layout weighted by
Jaccard), so a page always opens with the same picture.
"""

from __future__ import annotations

import html
import json
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


def _page(title: str, data: Any, body: str, script: str) -> str:
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__BODY__", body)
        .replace("__SCRIPT__", script)
        .replace("__DATA__", embed_json(data))
    )


def subgraph_page(data: dict[str, Any]) -> str:
    """The interactive page of one subgraph, from ``subgraph_data(...)``: drag nodes, drag the background to pan,
    wheel to zoom, double-click to re-fit; hover or click a node for its latent, activation count, top tokens,
    strongest edges and Neuronpedia link. Node area grows with the activation count, edge width and opacity with
    the Jaccard weight."""
    title = f"Subgraph {data['subgraph_id']}: {len(data['nodes'])} latents"
    title += f" (activity threshold {data['activity_threshold']})"
    return _page(title, data, _GRAPH_BODY, _GRAPH_SCRIPT)


def index_page(entries: list[dict[str, Any]], activity_threshold: float, histogram: str | None) -> str:
    """The page listing the subgraph pages, sortable by each column. ``entries``: one ``{"id", "size", "n_edges",
    "mean_weight", "activations", "top_tokens", "file"}`` per page; ``histogram``: a relative path to the size
    histogram image, shown above the table."""
    data = {"activity_threshold": float(activity_threshold), "histogram": histogram, "subgraphs": entries}
    return _page(f"Latent subgraphs at activity threshold {activity_threshold}", data, _INDEX_BODY, _INDEX_SCRIPT)


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


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; padding: 0 16px 16px; color: #222; }
h1 { font-size: 18px; margin: 12px 0 4px; }
p.help { color: #666; margin: 0 0 8px; }
#graph { width: 100%; height: 70vh; border: 1px solid #ccc; display: block; cursor: grab; touch-action: none; }
#tip { position: fixed; display: none; max-width: 420px; background: #fff; border: 1px solid #888;
       padding: 6px 8px; box-shadow: 0 2px 6px rgba(0,0,0,.25); white-space: pre-wrap; word-break: break-word; }
#tip .head { font-weight: bold; }
table { border-collapse: collapse; margin-top: 12px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td.tok { font-family: ui-monospace, monospace; white-space: pre-wrap; }
tr.sel { background: #fff3c4; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
__BODY__
<script type="application/json" id="graph-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("graph-data").textContent);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function linkTo(url, text) {
  const a = el("a", text);
  a.href = url; a.target = "_blank"; a.rel = "noopener noreferrer";
  return a;
}
function showTokens(list) { return list.map(t => JSON.stringify(t)).join(" "); }
function safeLink(url) { return typeof url === "string" && /^https:\\/\\//.test(url) ? url : null; }
function sortable(table, rows, columns, render, key, dir) {
  const head = el("tr");
  for (const c of columns) {
    const th = el("th", c.label);
    th.addEventListener("click", () => { dir = key === c.key ? -dir : (c.numeric ? -1 : 1); key = c.key; fill(); });
    head.append(th);
  }
  const thead = el("thead"), tbody = el("tbody");
  thead.append(head);
  table.append(thead, tbody);
  function fill() {
    const sorted = rows.slice().sort((a, b) => (a[key] < b[key] ? -dir : a[key] > b[key] ? dir : 0));
    tbody.replaceChildren(...sorted.map(render));
  }
  fill();
}
__SCRIPT__
</script>
</body>
</html>
"""

_GRAPH_BODY = """<p class="help">Drag a node to move it, drag the background to pan, scroll to zoom, double-click to
re-fit. Hover or click a node for its details. Node area: tokens the latent is active on; edge width and opacity:
Jaccard similarity.</p>
<canvas id="graph"></canvas>
<div id="tip"></div>
<table id="nodes"></table>"""

_GRAPH_SCRIPT = """
const canvas = document.getElementById("graph"), ctx = canvas.getContext("2d"), tip = document.getElementById("tip");
const nodes = DATA.nodes.map(n => Object.assign({}, n, {degree: 0, nbrs: []}));
const at = new Map(nodes.map((n, i) => [n.id, i]));
const edges = DATA.edges.map(([a, b, w]) => [at.get(a), at.get(b), w]);
for (const [a, b, w] of edges) {
  nodes[a].degree++; nodes[b].degree++;
  nodes[a].nbrs.push([b, w]); nodes[b].nbrs.push([a, w]);
}
for (const n of nodes) n.nbrs.sort((p, q) => q[1] - p[1]);
const maxAct = Math.max(1, ...nodes.map(n => n.activations));
for (const n of nodes) n.r = 4 + 12 * Math.sqrt(n.activations / maxAct);
const BUCKETS = 10, buckets = Array.from({length: BUCKETS}, () => []);
for (const e of edges) buckets[Math.min(BUCKETS - 1, Math.floor(e[2] * BUCKETS))].push(e);
const view = {scale: 1, x: 0, y: 0};
let hover = -1, selected = -1, drag = null, queued = false;

function sx(n) { return n.x * view.scale + view.x; }
function sy(n) { return -n.y * view.scale + view.y; }
function fit() {
  const w = canvas.clientWidth, h = canvas.clientHeight, m = 30;
  const xs = nodes.map(n => n.x), ys = nodes.map(n => -n.y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  view.scale = Math.min((w - 2 * m) / Math.max(x1 - x0, 1e-6), (h - 2 * m) / Math.max(y1 - y0, 1e-6));
  if (!isFinite(view.scale) || view.scale <= 0) view.scale = 1;
  view.x = w / 2 - view.scale * (x0 + x1) / 2;
  view.y = h / 2 - view.scale * (y0 + y1) / 2;
}
function resize() {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(canvas.clientWidth * dpr);
  canvas.height = Math.round(canvas.clientHeight * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  fit();
  draw();
}
function request() { if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; draw(); }); } }
function draw() {
  ctx.clearRect(0, 0, canvas.clientWidth, canvas.clientHeight);
  const focus = selected >= 0 ? selected : hover;
  ctx.strokeStyle = "#3a5f8f";
  buckets.forEach((list, k) => {
    if (!list.length) return;
    const w = (k + 0.5) / BUCKETS;
    ctx.globalAlpha = focus >= 0 ? 0.08 : 0.15 + 0.75 * w;
    ctx.lineWidth = 0.5 + 4 * w;
    ctx.beginPath();
    for (const [a, b] of list) { ctx.moveTo(sx(nodes[a]), sy(nodes[a])); ctx.lineTo(sx(nodes[b]), sy(nodes[b])); }
    ctx.stroke();
  });
  if (focus >= 0) {
    ctx.strokeStyle = "#d9822b";
    const f = nodes[focus];
    for (const [o, w] of f.nbrs) {
      ctx.globalAlpha = 0.3 + 0.7 * w;
      ctx.lineWidth = 0.5 + 4 * w;
      ctx.beginPath(); ctx.moveTo(sx(f), sy(f)); ctx.lineTo(sx(nodes[o]), sy(nodes[o])); ctx.stroke();
    }
  }
  ctx.globalAlpha = 1;
  const labels = nodes.length <= 100 || view.scale > 600;
  ctx.font = "11px system-ui, sans-serif";
  nodes.forEach((n, i) => {
    ctx.beginPath();
    ctx.arc(sx(n), sy(n), n.r, 0, 2 * Math.PI);
    ctx.fillStyle = i === focus ? "#d9822b" : "#6c9bd2";
    ctx.fill();
    ctx.lineWidth = 1; ctx.strokeStyle = "#fff"; ctx.stroke();
    if (labels || i === focus) { ctx.fillStyle = "#222"; ctx.fillText(String(n.id), sx(n) + n.r + 2, sy(n) + 4); }
  });
}
function hit(px, py) {
  for (let i = nodes.length - 1; i >= 0; i--) {
    const n = nodes[i], dx = sx(n) - px, dy = sy(n) - py;
    if (dx * dx + dy * dy <= (n.r + 3) * (n.r + 3)) return i;
  }
  return -1;
}
function showTip(i, cx, cy) {
  if (i < 0) { tip.style.display = "none"; return; }
  const n = nodes[i];
  tip.replaceChildren(el("div", "latent " + n.id, "head"), el("div", "active on " + n.activations + " tokens"));
  if (n.top_input.length) tip.append(el("div", "top input tokens: " + showTokens(n.top_input)));
  if (n.top_output.length) tip.append(el("div", "top output tokens: " + showTokens(n.top_output)));
  const shown = n.nbrs.slice(0, 8).map(([o, w]) => nodes[o].id + " (" + w.toFixed(3) + ")").join(", ");
  tip.append(el("div", n.degree + " edges; strongest: " + shown));
  const url = safeLink(n.link);
  if (url) tip.append(linkTo(url, "open on Neuronpedia"));
  tip.style.display = "block";
  tip.style.left = Math.min(cx + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = Math.min(cy + 14, window.innerHeight - tip.offsetHeight - 8) + "px";
}
function local(ev) { const r = canvas.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; }
canvas.addEventListener("pointerdown", ev => {
  const [px, py] = local(ev), i = hit(px, py);
  drag = {node: i, px, py, vx: view.x, vy: view.y, moved: false};
  canvas.setPointerCapture(ev.pointerId);
});
canvas.addEventListener("pointermove", ev => {
  const [px, py] = local(ev);
  if (drag) {
    if (Math.abs(px - drag.px) + Math.abs(py - drag.py) > 3) drag.moved = true;
    if (!drag.moved) return;
    if (drag.node >= 0) {
      nodes[drag.node].x = (px - view.x) / view.scale;
      nodes[drag.node].y = -(py - view.y) / view.scale;
    } else {
      view.x = drag.vx + px - drag.px; view.y = drag.vy + py - drag.py;
    }
    request();
    return;
  }
  const i = hit(px, py);
  if (i !== hover) { hover = i; request(); }
  if (selected < 0) showTip(hover, ev.clientX, ev.clientY);
});
canvas.addEventListener("pointerup", ev => {
  if (drag && !drag.moved) { selected = drag.node; showTip(selected, ev.clientX, ev.clientY); markRow(); request(); }
  drag = null;
});
canvas.addEventListener("pointerleave", () => { if (selected < 0 && !drag) { hover = -1; showTip(-1); request(); } });
canvas.addEventListener("wheel", ev => {
  ev.preventDefault();
  const [px, py] = local(ev), f = Math.exp(-ev.deltaY * 0.0015);
  view.x = px - (px - view.x) * f; view.y = py - (py - view.y) * f; view.scale *= f;
  request();
}, {passive: false});
canvas.addEventListener("dblclick", () => { fit(); request(); });
window.addEventListener("resize", resize);

const rowOf = new Map();
function markRow() { for (const [i, tr] of rowOf) tr.classList.toggle("sel", i === selected); }
sortable(document.getElementById("nodes"), nodes.map((n, i) => Object.assign({i}, n)), [
  {key: "id", label: "latent", numeric: true},
  {key: "activations", label: "active on (tokens)", numeric: true},
  {key: "degree", label: "edges", numeric: true},
  {key: "top_input", label: "top input tokens"},
  {key: "top_output", label: "top output tokens"},
  {key: "link", label: "Neuronpedia"},
], n => {
  const tr = el("tr");
  tr.append(el("td", String(n.id)), el("td", String(n.activations)), el("td", String(n.degree)),
            el("td", showTokens(n.top_input), "tok"), el("td", showTokens(n.top_output), "tok"));
  const td = el("td"), url = safeLink(n.link);
  if (url) td.append(linkTo(url, "link"));
  tr.append(td);
  tr.addEventListener("click", () => { selected = n.i; markRow(); request(); });
  rowOf.set(n.i, tr);
  return tr;
}, "activations", -1);
resize();
"""

_INDEX_BODY = """<p class="help">Click a column header to sort; click a subgraph to open its graph.</p>
<img id="histogram" alt="histogram of subgraph sizes">
<table id="subgraphs"></table>"""

_INDEX_SCRIPT = """
const img = document.getElementById("histogram");
if (DATA.histogram) img.src = DATA.histogram; else img.remove();
sortable(document.getElementById("subgraphs"), DATA.subgraphs, [
  {key: "size", label: "latents", numeric: true},
  {key: "id", label: "subgraph", numeric: true},
  {key: "n_edges", label: "edges", numeric: true},
  {key: "mean_weight", label: "mean Jaccard", numeric: true},
  {key: "activations", label: "activations (sum)", numeric: true},
  {key: "top_tokens", label: "top tokens of its most active latent"},
], s => {
  const tr = el("tr"), td = el("td"), a = el("a", "subgraph " + s.id);
  a.href = encodeURI(s.file);
  td.append(a);
  tr.append(el("td", String(s.size)), td, el("td", String(s.n_edges)), el("td", s.mean_weight.toFixed(3)),
            el("td", String(s.activations)), el("td", showTokens(s.top_tokens), "tok"));
  return tr;
}, "size", -1);
"""
