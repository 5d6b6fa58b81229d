"""Selections kept in the URL's query parameters, so a view can be shared and reopened."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import streamlit as st

T = TypeVar("T")


def get_int(name: str, default: int, low: int, high: int) -> tuple[int, str | None]:
    """The query parameter ``name`` as an int in ``low..high``: ``(value, message)``; a missing or bad value gives
    the nearest valid one and a message saying so."""
    raw = st.query_params.get(name)
    if raw is None:
        return default, None
    try:
        value = int(raw)
    except ValueError:
        return default, f"{name}={raw!r} in the URL is not a number; showing {default}"
    if not low <= value <= high:
        nearest = min(max(value, low), high)
        return nearest, f"{name}={value} in the URL is out of range {low}..{high}; showing {nearest}, the nearest"
    return value, None


def get_choice(name: str, choices: Sequence[str], default: str | None = None) -> tuple[str, str | None]:
    """The query parameter ``name`` if it is one of ``choices``, else the default and a message."""
    fallback = default if default is not None else choices[0]
    raw = st.query_params.get(name)
    if raw is None or raw in choices:
        return (raw if raw is not None else fallback), None
    return fallback, f"{name}={raw!r} in the URL is not one of {list(choices)}; showing {fallback!r}"


def put(**values: object) -> None:
    """Write the selections to the URL."""
    for key, value in values.items():
        if st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


def synced(name: str, value: T, make: Callable[[str], T]) -> T:
    """The widget ``make(key)`` for the query parameter ``name`` (whose value, read from the URL, is ``value``);
    returns the widget's value and writes it to the URL.

    The widget has a fixed ``key`` and no default of its own: a Streamlit widget whose default changes between runs is
    a new widget that forgets its state, so every other edit would bounce back. Its state is set from the URL only
    when the URL changed from elsewhere (a link, a button, a page opened afresh).
    """
    key, seen = f"{name}__widget", f"{name}__seen"
    if key not in st.session_state or st.session_state.get(seen) != value:
        st.session_state[key] = value
    chosen = make(key)
    st.session_state[seen] = chosen
    put(**{name: chosen})
    return chosen
