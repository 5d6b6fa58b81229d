"""Token contexts as shaded text: the HTML lives in ``templates/``; Python only fills in escaped values."""

from __future__ import annotations

import html
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from string import Template


@cache
def template(name: str) -> Template:
    """The package template ``templates/<name>`` (``${field}`` placeholders)."""
    return Template(files(__package__).joinpath("templates", name).read_text(encoding="utf-8"))


def style() -> str:
    """The ``<style>`` element of the explorer's own classes."""
    return template("style.html").template


def shown(token: str) -> str:
    """A token as it reads in a context: newlines and tabs made visible."""
    return token.replace("\n", "↵").replace("\t", "⇥")


def context_html(tokens: Sequence[str | None], values: Sequence[float], scale: float, centre: int | None = None) -> str:
    """A context: each token's background shaded by ``value / scale`` (title: the value); ``None`` tokens (not
    stored) are shown greyed; ``centre`` is outlined. Every string is HTML-escaped."""
    scale = scale if scale > 0 else 1.0
    parts = []
    for i, (tok, value) in enumerate(zip(tokens, values, strict=True)):
        extra = " ms-centre" if i == centre else ""
        if tok is None:
            tok, extra = "·", extra + " ms-missing"
        alpha = min(max(value / scale, 0.0), 1.0)
        parts.append(
            template("token.html")
            .substitute(
                extra=extra,
                alpha=f"{alpha:.3f}",
                title=html.escape(f"{tok!r}: {value:.3f}", quote=True),
                text=html.escape(shown(tok)),
            )
            .strip()
        )
    return template("context.html").substitute(tokens="".join(parts)).strip()
