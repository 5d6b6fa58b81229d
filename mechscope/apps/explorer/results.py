"""What a results directory holds, read lazily and cached, and what to run when something is missing.

The caches are ``st.cache_resource``: every rerun gets the same objects, not a copy (``st.cache_data`` unpickles a
fresh copy at each call, tens of MB per dashboard tensor), so the views treat them as read-only.

Every path the app opens comes from :func:`inside`, which refuses anything outside the results directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from mechscope.apps.explorer.launch import RESULTS_ENV
from mechscope.cooccurrence.layout import load_partners, partners_path, read_node_table
from mechscope.cooccurrence.records import Partners
from mechscope.dashboards.layout import META, find_dashboards, read_array, read_meta, read_vocab


class MissingResults(Exception):
    """Something the view needs is not in the results directory; the message says which command makes it."""


def results_dir() -> Path:
    """The directory the app was started on (``mechscope app RESULTS_DIR``)."""
    return Path(os.environ.get(RESULTS_ENV, "demo_output")).resolve()


def inside(root: Path, relative: str | Path) -> Path:
    """``root / relative``, refusing a path that leaves ``root`` (``..``, absolute paths, links out)."""
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise MissingResults(f"{relative} is outside the results directory {root}")
    return path


@dataclass(frozen=True)
class DashboardSet:
    """One SAE's dashboards: ``path`` (a folder holding ``dashboards.json``), named by its place under the root."""

    name: str
    path: Path


def dashboard_sets(root: Path) -> list[DashboardSet]:
    """Every dashboards folder under ``root`` (up to three levels down), sorted by name."""
    return [DashboardSet(str(p.relative_to(root)), p) for p in find_dashboards(root)]


def require_dashboards(root: Path) -> list[DashboardSet]:
    sets = dashboard_sets(root)
    if not sets:
        raise MissingResults(
            f"no latent dashboards in {root}: run `mechscope demo --out-dir {root}` (its dashboards stage) or "
            f"`mechscope dashboards CONFIG`"
        )
    return sets


def _stamp(path: Path) -> float:
    return (path / META).stat().st_mtime


@st.cache_resource(show_spinner=False, max_entries=64)
def _array(path: str, name: str, stamp: float) -> np.ndarray:
    return read_array(path, name)


def array(ds: DashboardSet, name: str) -> np.ndarray:
    """One tensor of the dashboards (``"top.values"`` ...) as a numpy array, read once and cached."""
    try:
        return _array(str(ds.path), name, _stamp(ds.path))
    except Exception as e:  # a corrupt or truncated file: name it
        raise MissingResults(
            f"{ds.path / 'dashboards.safetensors'} cannot be read ({e}); run the dashboards stage again"
        ) from e


@st.cache_resource(show_spinner=False)
def _meta(path: str, stamp: float) -> dict[str, Any]:
    meta = read_meta(path)
    assert meta is not None  # dashboard_sets found the file
    return meta


def meta(ds: DashboardSet) -> dict[str, Any]:
    try:
        return _meta(str(ds.path), _stamp(ds.path))
    except ValueError as e:
        raise MissingResults(str(e)) from e


@st.cache_resource(show_spinner=False)
def _vocab(path: str, stamp: float) -> list[str]:
    return read_vocab(path)


def vocab(ds: DashboardSet) -> list[str]:
    """The token strings (index: token id)."""
    try:
        return _vocab(str(ds.path), _stamp(ds.path))
    except (OSError, ValueError) as e:
        raise MissingResults(f"{ds.path / 'vocab.json'} cannot be read ({e}); run the dashboards stage again") from e


# ---- co-occurrence results ---------------------------------------------------------------------------------------


def cooc_dirs(root: Path) -> dict[str, Path]:
    """Hook folders of co-occurrence results (``root/cooc/<hook>`` or ``root/<hook>``) holding a node table."""
    found: dict[str, Path] = {}
    for base in (root / "cooc", root):
        for d in sorted(p for p in base.glob("*") if p.is_dir()):
            if any((d / "dataframes").glob("node_info_df_*.parquet")):
                found.setdefault(d.name, d)
    return found


def partner_thresholds(hook_dir: Path) -> list[str]:
    """Threshold tags (``"0_0"``) at which ``hook_dir`` holds each latent's most co-occurring latents."""
    return sorted(
        p.stem.removeprefix("top_cooccurring_") for p in (hook_dir / "dataframes").glob("top_cooccurring_*.npz")
    )


def tag_value(tag: str) -> float:
    """``"10_0"`` -> 10.0 (file names write the threshold with ``_`` for ``.``)."""
    return float(tag.replace("_", "."))


@st.cache_resource(show_spinner=False, max_entries=8)
def _partners(path: str, stamp: float) -> Partners:
    return load_partners(path)


def partners(hook_dir: Path, tag: str) -> Partners:
    """Each latent's most co-occurring latents at threshold ``tag``, read once and cached."""
    path = partners_path(hook_dir, tag_value(tag))
    try:
        return _partners(str(path), path.stat().st_mtime)
    except (OSError, ValueError, KeyError) as e:
        raise MissingResults(f"{path} cannot be read ({e}); run the graphs stage again") from e


@st.cache_resource(show_spinner=False, max_entries=8)
def _subgraph_of(hook_dir: str, tag: str, stamp: float) -> dict[str, list[int]]:
    return read_node_table(hook_dir, tag_value(tag), ["node_id", "subgraph_id", "subgraph_size"])


def subgraph_of(hook_dir: Path, tag: str) -> dict[str, list[int]]:
    """The node table's ``node_id``, ``subgraph_id`` and ``subgraph_size`` columns at threshold ``tag``."""
    path = hook_dir / "dataframes" / f"node_info_df_{tag}.parquet"
    try:
        return _subgraph_of(str(hook_dir), tag, path.stat().st_mtime)
    except (OSError, ValueError, KeyError) as e:
        raise MissingResults(f"{path} cannot be read ({e}); run the graphs stage again") from e
