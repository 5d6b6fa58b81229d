"""The explorer's Streamlit script: ``mechscope app RESULTS_DIR`` runs it (see :mod:`.launch`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import streamlit as st

from mechscope.apps.explorer import cooc_view, latent_view, results, state
from mechscope.apps.explorer.render import style


def inspector(root: Path) -> None:
    """The prompt inspector, its module imported when the view is first opened: it needs the model stack
    (transformers, seconds to import), which the other views and a start of the app do not."""
    importlib.import_module("mechscope.apps.explorer.inspector_view").show(root)


VIEWS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "cooc": ("Co-occurrence explorer", cooc_view.show),
    "latent": ("Latent dashboard", latent_view.show),
    "inspector": ("Prompt inspector", inspector),
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
