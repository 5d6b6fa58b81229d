"""View 1, the co-occurrence explorer (the sae_cooccurrence paper's app on mechscope's results): pick a hook,
an activity threshold, a subgraph size and a subgraph; the subgraph's PCA, coloured by the most active latent;
click a point for the subgraph latents' activations there, its token and context, and the graph recoloured by
them; recolour the PCA by one latent ("latent landscape"); search subgraphs by latent or by token."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import streamlit as st

from mechscope.apps.explorer import figures, results, state
from mechscope.cooccurrence.layout import load_graph_summary, load_pca_results, load_subgraph

PCA_FILE = re.compile(r"graph_analysis_results_size_(\d+)_activation_(.+)\.h5$")


def pca_files(hook_dir: Path) -> dict[str, dict[int, Path]]:
    """``{threshold tag: {size: path}}`` of the PCA results under ``hook_dir/pca``."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted((hook_dir / "pca").glob("*.h5")):
        m = PCA_FILE.match(path.name)
        if m:
            found.setdefault(m[2], {})[int(m[1])] = path
    return found


def pca_sizes_hint(hook_dir: Path, tag: str) -> str:
    """What the PCA stage covered at ``tag``: ``"sizes 2, 5, 6"`` (or ``"no size"``)."""
    sizes = sorted(pca_files(hook_dir).get(tag, {}))
    return f"sizes {', '.join(map(str, sizes))}" if sizes else "no size"


def hooks(root: Path) -> dict[str, Path]:
    """Hook folders of the co-occurrence results (``root/cooc/<hook>`` or ``root/<hook>``) that hold PCA results."""
    found = {hook: d for hook, d in results.cooc_dirs(root).items() if (d / "pca").is_dir()}
    if not found:
        raise results.MissingResults(
            f"no co-occurrence PCA results under {root}: run `mechscope demo --out-dir {root}` or "
            f"`mechscope cooc run {root}/cooc.toml`"
        )
    return found


@st.cache_resource(show_spinner="reading the PCA results", max_entries=16)
def _pca(path: str, stamp: float) -> dict[int, Any]:
    return load_pca_results(path)


def pca_results(path: Path) -> dict[int, Any]:
    try:
        return _pca(str(path), path.stat().st_mtime)
    except OSError as e:
        raise results.MissingResults(f"{path} cannot be read ({e}); run the PCA stage again") from e


def subgraph_label(result: Any) -> str:
    tops = ", ".join(repr(t) for t in result.top_tokens[:3])
    return f"subgraph {result.subgraph_id}: {tops} — {result.example_context[:60]!r}"


def pick(label: str, options: list[Any], param: str, fmt=str) -> Any:
    keys = [str(o) for o in options]
    chosen, message = state.get_choice(param, keys)
    if message:
        st.warning(message)
    value = options[keys.index(chosen)]
    return state.synced(param, value, lambda key: st.sidebar.selectbox(label, options, format_func=fmt, key=key))


def search(root: Path, hook_dir: Path, files: dict[int, Path], query: str) -> list[tuple[int, int, str]]:
    """``(size, subgraph, why)`` for subgraphs holding latent ``query`` (a number) or a token equal to it."""
    hits = []
    wanted = query.strip()
    for size, path in files.items():
        for sid, r in pca_results(path).items():
            if wanted.isdigit() and int(wanted) in r.pca.nodes:
                hits.append((size, sid, f"holds latent {wanted}"))
            elif wanted and any(t.strip() == wanted for t in r.tokens):
                hits.append((size, sid, f"fires on {wanted!r}"))
    return hits


def show(root: Path) -> None:
    st.header("Co-occurrence explorer")
    hook_dirs = hooks(root)
    hook = pick("hook", list(hook_dirs), "hook")
    by_threshold = pca_files(hook_dirs[hook])
    if not by_threshold:
        raise results.MissingResults(f"no PCA results in {hook_dirs[hook]}/pca: run the PCA stage")
    thresholds = sorted(by_threshold, key=results.tag_value)
    tag = pick("activity threshold", thresholds, "t", fmt=lambda t: f"{results.tag_value(t):g}")
    files = by_threshold[tag]
    size = pick("subgraph size", sorted(files), "size")
    subs = pca_results(files[size])
    if not subs:
        st.info(f"the PCA results of size {size} at threshold {results.tag_value(tag):g} hold no subgraph")
        return
    sid = pick("subgraph", sorted(subs), "sg", fmt=lambda i: subgraph_label(subs[i]))
    result = subs[sid]
    pca = result.pca

    query = st.sidebar.text_input("search subgraphs: latent index or token", key="search")
    if query:
        hits = search(root, hook_dirs[hook], files, query)[:20]
        if not hits:
            st.sidebar.text(f"no subgraph at this threshold holds {query!r}")
        for hit_size, hit_sid, why in hits:
            if st.sidebar.button(f"size {hit_size} · subgraph {hit_sid}", key=f"hit_{hit_size}_{hit_sid}"):
                state.put(size=hit_size, sg=hit_sid)
                st.rerun()
            st.sidebar.text(why)  # plain text: a token is never read as markup

    n_pcs = pca.coords.shape[1]
    pcx, msg_x = state.get_int("pcx", 0, 0, n_pcs - 1)
    pcy, msg_y = state.get_int("pcy", min(1, n_pcs - 1), 0, n_pcs - 1)
    for m in (msg_x, msg_y):
        if m:
            st.warning(m)
    c1, c2, c3 = st.columns(3)
    pcs = list(range(n_pcs))
    pcx = state.synced("pcx", pcx, lambda key: c1.selectbox("x axis", pcs, format_func=lambda k: f"PC{k + 1}", key=key))
    pcy = state.synced("pcy", pcy, lambda key: c2.selectbox("y axis", pcs, format_func=lambda k: f"PC{k + 1}", key=key))
    nodes = list(pca.nodes)
    landscape = c3.selectbox(
        "colour by",
        ["most active latent", "most active subgraph latent", *nodes],
        key="landscape",
        format_func=lambda v: v if isinstance(v, str) else f"latent {v}'s activation",
    )

    hover = [f"{t!r} · {c}" for t, c in zip(result.tokens, result.contexts, strict=True)]
    colour: list[str] | list[float]
    if landscape == "most active latent":  # over all latents, as the reference app colours it
        colour = [
            str(int(i)) if inside else "outside" for i, inside in zip(pca.top_index, pca.top_in_subgraph, strict=True)
        ]
    elif isinstance(landscape, str):  # among the subgraph's latents (the reference's plot_pca_with_top_feature)
        top = pca.activations.argmax(axis=1).tolist()
        colour = [str(nodes[j]) if pca.activations[i, j] > 0 else "none active" for i, j in enumerate(top)]
    else:
        colour = pca.activations[:, nodes.index(landscape)].tolist()
    fig = figures.scatter(pca.coords[:, pcx], pca.coords[:, pcy], colour, hover, f"PC{pcx + 1}", f"PC{pcy + 1}")
    left, right = st.columns([3, 2])
    with left:
        st.markdown(f"**PCA of {subgraph_label(result)}** ({len(result.tokens)} tokens)")
        event = st.plotly_chart(fig, key="pca", on_select="rerun", selection_mode="points")
    picked = _picked_point(event)
    if picked is None:
        picked, _ = state.get_int("point", -1, -1, len(result.tokens) - 1)
    point_acts = None
    with right:
        if picked >= 0:
            state.put(point=picked)
            point_acts = pca.activations[picked]
            st.markdown(f"**Point {picked}**")
            st.text(f"token {result.tokens[picked]!r}")  # plain text: a token is never read as markup
            st.code(result.contexts[picked], language=None)
            st.plotly_chart(
                figures.bars([f"latent {n}" for n in nodes], point_acts.tolist(), "subgraph latents at this point"),
                key="point_bars",
            )
        else:
            st.caption("click a point of the PCA to see the subgraph's latents there")
    graph = load_subgraph(hook_dirs[hook], results.tag_value(tag), sid)
    at_point = None if point_acts is None else dict(zip(nodes, point_acts.tolist(), strict=True))
    st.plotly_chart(
        figures.graph(graph["nodes"], graph["edges"], graph["weights"], at_point, densities(root, nodes)), key="graph"
    )
    _summary(root, hook_dirs[hook], results.tag_value(tag))


def densities(root: Path, nodes: list[int]) -> dict[int, float] | None:
    """Each latent's density from the dashboards, when there are any (node sizes of the graph)."""
    sets = results.dashboard_sets(root)
    if not sets:
        return None
    firing = results.array(sets[0], "firing")
    n = max(int(results.meta(sets[0])["n_tokens"]), 1)
    return {i: float(firing[i]) / n for i in nodes if i < firing.size}


def _picked_point(event: Any) -> int | None:
    """The clicked point's row in the PCA results: its ``customdata`` (each trace holds one colour's points)."""
    try:
        points = event.selection.points
    except AttributeError:
        return None
    if not points:
        return None
    data = points[0].get("customdata")
    return int(data[0] if isinstance(data, list) else data)


def _summary(root: Path, hook_dir: Path, threshold: float) -> None:
    try:
        summary = load_graph_summary(hook_dir, threshold)
    except FileNotFoundError as e:
        st.caption(str(e))
        return
    with st.expander("run summary at this threshold", expanded=True):
        st.json({k: v for k, v in summary.items() if k != "histogram"})
        histogram = summary.get("histogram")
        if histogram and Path(histogram).exists():
            st.image(str(results.inside(root, histogram)), caption="subgraph sizes")
