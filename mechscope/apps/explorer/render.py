"""Token contexts as shaded text and logit-effect tables: the HTML lives in ``templates/``; Python only fills in
escaped values."""

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


def effects_html(tokens: Sequence[str], values: Sequence[float]) -> str:
    """A table of tokens and their logit effects, each row with a bar as long as ``|value|`` relative to the
    largest (blue when positive, red when negative). Every token is shown as its ``repr`` and HTML-escaped."""
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    rows = "".join(
        template("effect_row.html")
        .substitute(
            token=html.escape(repr(tok)),
            width=f"{100 * abs(value) / scale:.1f}",
            colour="#1f77b4" if value >= 0 else "#d62728",
            value=f"{value:+.3f}",
        )
        .strip()
        for tok, value in zip(tokens, values, strict=True)
    )
    return template("effects.html").substitute(rows=rows).strip()
