"""The explorer's Streamlit script: ``mechscope app RESULTS_DIR`` runs it (see :mod:`.launch`)."""

from __future__ import annotations

import streamlit as st

from mechscope.apps.explorer import cooc_view, inspector_view, latent_view, results, state
from mechscope.apps.explorer.render import style

VIEWS = {
    "cooc": ("Co-occurrence explorer", cooc_view.show),
    "latent": ("Latent dashboard", latent_view.show),
    "inspector": ("Prompt inspector", inspector_view.show),
}


def main() -> None:
    st.set_page_config(page_title="mechscope explorer", layout="wide")
    st.html(style())
    root = results.results_dir()
    st.sidebar.title("mechscope")
    st.sidebar.caption(f"results: {root}")
    view, message = state.get_choice("view", list(VIEWS))
    view = state.synced(
        "view", view, lambda key: st.sidebar.radio("view", list(VIEWS), format_func=lambda v: VIEWS[v][0], key=key)
    )
    if message:
        st.warning(message)
    try:
        VIEWS[view][1](root)
    except results.MissingResults as e:
        st.error(str(e))


main()
