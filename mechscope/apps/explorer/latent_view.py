"""View 2, the latent dashboard: top-activating contexts, binned samples, the activation histogram, logit effects,
density, the most co-occurring latents and the latent's subgraph (when the co-occurrence results are there); find a
latent by index or by a token it fires on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from mechscope.apps.explorer import cooc_view, figures, results, state
from mechscope.apps.explorer.render import context_html, effects_html
from mechscope.cooccurrence.links import neuronpedia_link
from mechscope.dashboards.layout import NO_TOKEN


def pick_set(root: Path) -> results.DashboardSet:
    sets = results.require_dashboards(root)
    names = [s.name for s in sets]
    name, message = state.get_choice("sae", names)
    if message:
        st.warning(message)
    if len(sets) > 1:
        name = state.synced("sae", name, lambda key: st.sidebar.selectbox("SAE", names, key=key))
    return sets[names.index(name)]


def token_strings(vocab: list[str], ids: np.ndarray) -> list[str | None]:
    return [None if int(i) == NO_TOKEN else vocab[int(i)] for i in ids]


def latents_firing_on(ds: results.DashboardSet, token: str, limit: int = 20) -> list[tuple[int, int]]:
    """``(latent, count)``: latents whose top examples sit on a token equal to ``token`` (stripped, any case)."""
    vocab = results.vocab(ds)
    wanted = token.strip().lower()
    ids = np.array([i for i, t in enumerate(vocab) if t.strip().lower() == wanted], dtype=np.int64)
    if ids.size == 0:
        return []
    tokens = results.array(ds, "top.tokens")
    centre = tokens[:, :, tokens.shape[2] // 2]
    counts = np.isin(centre, ids).sum(axis=1)
    order = np.argsort(-counts, kind="stable")[:limit]
    return [(int(i), int(counts[i])) for i in order if counts[i] > 0]


def show_examples(ds: results.DashboardSet, group: str, row: int, scale: float, vocab: list[str]) -> int:
    """The examples of row ``row`` of ``group`` (``"top"`` or ``"bins"``), shaded; returns how many were shown."""
    context = results.array(ds, f"{group}.context")[row]
    tokens = results.array(ds, f"{group}.tokens")[row]
    acts = results.array(ds, f"{group}.activations")[row]
    values = results.array(ds, f"{group}.values")[row]
    shown = 0
    for slot in range(context.size):
        if int(context[slot]) < 0:
            continue
        centre = tokens.shape[1] // 2
        cols = st.columns([1, 9])
        cols[0].caption(f"{float(values[slot]):.2f}")
        cols[1].html(context_html(token_strings(vocab, tokens[slot]), acts[slot].tolist(), scale, centre))
        shown += 1
    return shown


def show(root: Path) -> None:
    st.header("Latent dashboard")
    ds = pick_set(root)
    meta = results.meta(ds)
    d_sae = int(meta["d_sae"])
    latent, message = state.get_int("latent", 0, 0, d_sae - 1)
    if message:
        st.warning(message)

    with st.sidebar:
        latent = state.synced(
            "latent", latent, lambda key: int(st.number_input("latent", min_value=0, max_value=d_sae - 1, key=key))
        )
        token = st.text_input("latents that fire on this token", key="find_token")
        if token:
            found = latents_firing_on(ds, token)
            if not found:
                st.caption(f"no latent has {token!r} among its top examples")
            for other, count in found:
                button(f"latent {other} ({count} of its top examples)", f"find_{other}", latent=other, sae=ds.name)
    state.put(view="latent", sae=ds.name)

    vocab = results.vocab(ds)
    firing = int(results.array(ds, "firing")[latent])
    max_act = float(results.array(ds, "max_activation")[latent])
    source = meta.get("source", {})
    st.subheader(f"Latent {latent} of {d_sae} · {source.get('hook_name', '')}")
    cols = st.columns(4)
    cols[0].metric("density", f"{firing / max(meta['n_tokens'], 1):.3%}")
    cols[1].metric("fires on", f"{firing:,} tokens", help=f"of {meta['n_tokens']:,}")
    cols[2].metric("max activation", f"{max_act:.3f}")
    if source.get("neuronpedia_id"):
        cols[3].link_button("Neuronpedia", neuronpedia_link(source["neuronpedia_id"], latent))
    if firing == 0:
        st.info(f"latent {latent} never fired on the {meta['n_tokens']:,} tokens: it is dead")
        return

    left, right = st.columns([3, 2])
    with left:
        st.markdown("**Top activations**")
        show_examples(ds, "top", latent, max_act, vocab)
        settings = meta["settings"]
        edges = results.array(ds, "bin_edges")[latent]
        st.markdown("**Samples from activation bins**")
        for b in reversed(range(settings["n_bins"])):
            with st.expander(
                f"bin {b + 1} of {settings['n_bins']}: ({float(edges[b]):.2f}, {float(edges[b + 1]):.2f}]"
            ):
                if not show_examples(ds, "bins", latent * settings["n_bins"] + b, max_act, vocab):
                    st.caption("no token in this bin")
    with right:
        st.plotly_chart(
            figures.histogram(
                results.array(ds, "histogram_edges")[latent].tolist(),
                results.array(ds, "histogram")[latent].tolist(),
                "activation histogram (non-zero)",
            ),
            key="histogram",
        )
        for kind, title in (("top", "promoted tokens"), ("bottom", "suppressed tokens")):
            ids = results.array(ds, f"logits.{kind}_tokens")[latent].tolist()
            vals = results.array(ds, f"logits.{kind}_values")[latent].tolist()
            st.markdown(f"**{title}** (logit effect)")
            st.html(effects_html([vocab[i] for i in ids], vals))  # HTML, not st.dataframe: that imports pandas
        show_cooccurring(root, source.get("hook_name", ""), latent)


def go(**params: object) -> None:
    """Open another view or latent: replace the URL's query parameters (a button's ``on_click``)."""
    st.query_params.from_dict({k: str(v) for k, v in params.items()})


def button(label: str, key: str, view: str = "latent", **params: object) -> None:
    """A button that opens ``view`` with the query parameters ``params`` (:func:`go`)."""
    st.button(label, key=key, on_click=go, kwargs={"view": view, **params})


def show_cooccurring(root: Path, hook: str, latent: int) -> None:
    """The latents that co-occur most with ``latent`` (by Jaccard) and its subgraph, at one activity threshold."""
    hook_dir = results.cooc_dirs(root).get(hook)
    st.markdown("**Co-occurring latents**")
    if hook_dir is None:
        st.caption(f"no co-occurrence results for {hook} under {root}: run `mechscope cooc run {root}/cooc.toml`")
        return
    tags = results.partner_thresholds(hook_dir)
    if not tags:
        st.caption(f"no top_cooccurring_*.npz in {hook_dir / 'dataframes'}: run the graphs stage again")
        return
    tag, message = state.get_choice("t", tags)
    if message:
        st.warning(message)
    if len(tags) > 1:
        shown = {t: f"{results.tag_value(t):g}" for t in tags}
        tag = state.synced(
            "t", tag, lambda key: st.selectbox("activity threshold", tags, format_func=shown.__getitem__, key=key)
        )
    partners = results.partners(hook_dir, tag)
    if latent >= partners.latents.shape[0]:
        st.caption(f"the co-occurrence results cover {partners.latents.shape[0]} latents, not latent {latent}")
        return
    found = [
        (int(j), float(v)) for j, v in zip(partners.latents[latent], partners.jaccard[latent], strict=True) if j >= 0
    ]
    if not found:
        st.caption(f"latent {latent} co-occurs with no other latent at threshold {results.tag_value(tag):g}")
    for other, jaccard in found:
        button(f"latent {other} · Jaccard {jaccard:.3f}", f"partner_{other}", latent=other, t=tag)
    table = results.subgraph_of(hook_dir, tag)
    row = table["node_id"].index(latent) if latent in table["node_id"] else None
    if row is None:
        return
    sid, size = table["subgraph_id"][row], table["subgraph_size"][row]
    if size < 2:
        st.caption(f"latent {latent} is alone in its subgraph at threshold {results.tag_value(tag):g}")
        return
    st.markdown(f"**Subgraph {sid}** ({size} latents at threshold {results.tag_value(tag):g})")
    pca = cooc_view.pca_files(hook_dir).get(tag, {}).get(size)
    if pca is not None and sid in cooc_view.pca_results(pca):
        button(
            "open its PCA in the co-occurrence explorer", "open_subgraph", "cooc", hook=hook, t=tag, size=size, sg=sid
        )
    else:
        st.caption(f"no PCA of this subgraph (the PCA stage takes {cooc_view.pca_sizes_hint(hook_dir, tag)})")
