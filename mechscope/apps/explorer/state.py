"""Selections kept in the URL's query parameters, so a view can be shared and reopened."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st


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
