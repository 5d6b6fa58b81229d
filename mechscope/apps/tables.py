"""Plain-text tables for the command line's reports: :func:`format_table`, and the co-occurrence graph summaries
(:func:`format_graph_summary`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A plain-text table with aligned columns; column indices in ``right`` are right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  " + "  ".join(padded).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def format_graph_summary(summaries: Mapping[str, Mapping[float, Mapping[str, Any]]]) -> str:
    """The co-occurrence graph summaries ``{hook: {threshold: summary}}`` (as
    :func:`mechscope.cooccurrence.pipeline.run_graphs` returns them) as a table, one row per hook and threshold,
    followed by the HTML index and histogram paths each summary names."""
    headers = ["hook", "threshold", "edge", "in subgraphs", "largest", "subgraphs", "mean size", "active/token"]
    rows, paths = [], []
    for hook, by_t in summaries.items():
        for t, s in by_t.items():
            rows.append(
                [
                    hook,
                    f"{t:g}",
                    f"{s['edge_threshold']:.4f}",
                    f"{s['share_in_subgraphs']:.1%}",
                    str(s["largest_subgraph"]),
                    str(s["n_subgraphs"]),
                    f"{s['mean_subgraph_size']:.2f}",
                    f"{s['mean_active_per_token']:.2f}",
                ]
            )
            paths += [f"  {hook} @ {t:g} histogram: {s['histogram']}"] if s.get("histogram") else []
    return "\n".join(["Co-occurrence graphs", format_table(headers, rows, right=list(range(1, 8))), *paths])
