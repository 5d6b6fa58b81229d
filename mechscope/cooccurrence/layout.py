"""Where every file of the co-occurrence pipeline lives under ``results_dir``, and the readers of what the graphs and
PCA stages write (node tables, summaries, subgraphs, partners, PCA files). Only numpy, h5py and pyarrow: the explorer
opens results through this module without importing torch, networkx, scipy or matplotlib. The writers, and the
readers of count matrices and checkpoints, are in :mod:`mechscope.cooccurrence.outputs`.

Layout (``t`` is the activity threshold with ``.`` as ``_``, one folder per hook name inside ``results_dir``)::

    count_checkpoint.npz                              partial counts of every (hook, threshold), state, settings
    summary.json                                      {hook: {threshold: graph summary}}
    <hook>/mechscope_cooc_{kind}_threshold_{t}.npz    total, jaccard (CSR) and activations, exact (the default)
    <hook>/feature_acts_cooc_{kind}_threshold_{t}.npz the same as the reference's dense float32 files, instead
                                                      (output_format="sae_cooccurrence")
    <hook>/feature_acts_cooc_n_tokens.json            {threshold: tokens counted}, written last
    <hook>/graph_summary_{t}.json                     the graph summary of one threshold
    <hook>/dataframes/node_info_df_{t}.csv, .parquet  the node table
    <hook>/dataframes/top_cooccurring_{t}.npz         each latent's most co-occurring latents and their Jaccard
    <hook>/subgraph_objects/activation_{t}/subgraph_{id}.json     one subgraph of more than one latent
    <hook>/subgraph_sizes_{t}.png                     the histogram of subgraph sizes
    <hook>/pca/graph_analysis_results_size_{n}_activation_{t}.h5
    <hook>/edge_thresholds.csv, <hook>/thresholded_matrices/   the reference's, with output_format="sae_cooccurrence"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow.parquet as pq

from mechscope.cooccurrence.records import Partners, SubgraphPCAResult, SubspacePCA

KINDS = ("total", "jaccard", "activations")
FILE_PREFIX = {"mechscope": "mechscope_cooc", "sae_cooccurrence": "feature_acts_cooc"}  # by output_format
TOKENS_FILE = "feature_acts_cooc_n_tokens.json"
CHECKPOINT = "count_checkpoint.npz"
SUMMARY = "summary.json"
EDGE_THRESHOLDS = "edge_thresholds.csv"


# ---- names ------------------------------------------------------------------------------------------------------


def threshold_tag(threshold: float) -> str:
    """A threshold as file names spell it: ``1.5`` -> ``"1_5"``, ``0`` -> ``"0_0"``."""
    return str(float(threshold)).replace(".", "_")


def graph_summary_path(results_dir: str | Path, activity_threshold: float) -> Path:
    """``results_dir/graph_summary_{t}.json``."""
    return Path(results_dir) / f"graph_summary_{threshold_tag(activity_threshold)}.json"


def subgraph_object_path(results_dir: str | Path, activity_threshold: float, subgraph_id: int) -> Path:
    """``results_dir/subgraph_objects/activation_{t}/subgraph_{id}.json``."""
    tag = threshold_tag(activity_threshold)
    return Path(results_dir) / "subgraph_objects" / f"activation_{tag}" / f"subgraph_{subgraph_id}.json"


def node_table_path(results_dir: str | Path, activity_threshold: float) -> Path:
    """``results_dir/dataframes/node_info_df_{t}.parquet`` (the CSV beside it has the same rows)."""
    return Path(results_dir) / "dataframes" / f"node_info_df_{threshold_tag(activity_threshold)}.parquet"


def partners_path(results_dir: str | Path, activity_threshold: float) -> Path:
    """``results_dir/dataframes/top_cooccurring_{t}.npz``."""
    return Path(results_dir) / "dataframes" / f"top_cooccurring_{threshold_tag(activity_threshold)}.npz"


def pca_results_path(results_dir: str | Path, size: int, activity_threshold: float) -> Path:
    """``results_dir/pca/graph_analysis_results_size_{size}_activation_{t}.h5`` (``t`` with ``.`` as ``_``)."""
    tag = threshold_tag(activity_threshold)
    return Path(results_dir) / "pca" / f"graph_analysis_results_size_{size}_activation_{tag}.h5"


def file_name(kind: str, threshold: float, output_format: str = "mechscope") -> str:
    """The file of one count matrix: ``mechscope_cooc_{kind}_threshold_{t}.npz`` (mechscope's exact sparse files)
    or, for ``output_format="sae_cooccurrence"``, the reference's ``feature_acts_cooc_{kind}_threshold_{t}.npz``
    (dense float32); e.g. ``("total", 1.5)`` -> ``mechscope_cooc_total_threshold_1_5.npz``.

    The two never share a name, so the reference's loader (which takes every ``feature_acts_cooc_{kind}*.npz`` and
    reads its first array) cannot pick up a sparse file and silently get its index vector.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if output_format not in FILE_PREFIX:
        raise ValueError(f"output_format must be one of {tuple(FILE_PREFIX)}, not {output_format!r}")
    return f"{FILE_PREFIX[output_format]}_{kind}_threshold_{threshold_tag(threshold)}.npz"


def matrix_path(results_dir: str | Path, kind: str, threshold: float) -> Path:
    """The count file of ``kind`` at ``threshold`` in ``results_dir``: mechscope's, else the reference's name (its
    files, and mechscope's before the two formats had different names). A missing file is a FileNotFoundError."""
    names = [file_name(kind, threshold, fmt) for fmt in FILE_PREFIX]
    for name in names:
        if (Path(results_dir) / name).exists():
            return Path(results_dir) / name
    raise FileNotFoundError(f"neither {' nor '.join(names)} is in {results_dir}: run the count stage first")


# ---- readers of the graphs and PCA stages' files ----------------------------------------------------------------


def load_partners(path: str | Path) -> Partners:
    """The :class:`Partners` that :func:`.outputs.save_partners` wrote."""
    with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:  # np.load(path) leaks a bad file
        return Partners(data["latents"], data["jaccard"])


def read_node_table(results_dir: str | Path, activity_threshold: float, columns: Sequence[str]) -> dict[str, list]:
    """The ``columns`` of the node table :func:`.outputs.save_graphs` wrote in ``results_dir`` (``{column:
    values}``, one value per latent, in the table's order)."""
    path = node_table_path(results_dir, activity_threshold)
    return pq.read_table(path, columns=list(columns)).to_pydict()


def load_graph_summary(results_dir: str | Path, activity_threshold: float) -> dict[str, Any]:
    """The summary :func:`.outputs.save_graphs` wrote in ``results_dir`` for ``activity_threshold``."""
    path = graph_summary_path(results_dir, activity_threshold)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the graphs stage first")
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary


def load_subgraph(results_dir: str | Path, activity_threshold: float, subgraph_id: int) -> dict[str, Any]:
    """The record :func:`.outputs.save_graphs` wrote for one subgraph of more than one latent: ``{"id", "nodes",
    "edges", "weights"}`` (edges as ``[i, j]`` lists)."""
    path = subgraph_object_path(results_dir, activity_threshold, subgraph_id)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the graphs stage (without skip_subgraph_files)")
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def load_pca_results(path: str | Path) -> dict[int, SubgraphPCAResult]:
    """Read a file written by :func:`.outputs.save_pca_results`: subgraph id -> its :class:`SubgraphPCAResult`."""
    out = {}
    with h5py.File(path, "r") as f:
        for g in f.values():
            table, where = g["pca_df"], g["all_token_dfs"]
            n_pcs = sum(1 for key in table if key.startswith("PC"))
            info = g["all_max_feature_info"][()]
            nodes = g["nodes"][()]
            top_index = info[:, 1].astype(np.int64)
            pca = SubspacePCA(
                nodes=nodes.tolist(),
                token_index=table["point_id"][()],
                activations=g["all_graph_feature_acts"][()],
                coords=np.stack([table[f"PC{k + 1}"][()] for k in range(n_pcs)], axis=1),
                components=g["components"][()],
                explained_variance_ratio=g["explained_variance_ratio"][()],
                top_value=info[:, 0].astype(np.float32),
                top_index=top_index,
                top_in_subgraph=info[:, 2].astype(bool),
            )
            subgraph_id = int(g.attrs["subgraph_id"])
            out[subgraph_id] = SubgraphPCAResult(
                subgraph_id=subgraph_id,
                pca=pca,
                token_id=where["token_id"][()],
                context_id=where["batch"][()],
                position=where["pos"][()],
                tokens=list(table["tokens"].asstr("utf-8")[()]),
                contexts=list(table["context"].asstr("utf-8")[()]),
                top_tokens=list(g["top_3_tokens"].asstr("utf-8")[()]),
                top_token_counts=g["top_3_token_counts"][()].tolist(),
                example_context=g["example_context"].asstr("utf-8")[()],
            )
    return out
