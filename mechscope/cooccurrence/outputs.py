"""Every file the co-occurrence pipeline writes, and the readers of its count matrices and checkpoints. The compute
modules return values; only this module touches disk, and only through :mod:`mechscope.files` (atomic writes), so an
interruption never leaves a partial file under its final name. Where each file lives (the layout) and the readers of
the graphs and PCA stages' files are in :mod:`mechscope.cooccurrence.layout`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from mechscope.cooccurrence.counting import CooccurrenceCounts, jaccard
from mechscope.cooccurrence.graph import GraphResults
from mechscope.cooccurrence.layout import (
    EDGE_THRESHOLDS,
    FILE_PREFIX,
    KINDS,
    SUMMARY,
    TOKENS_FILE,
    file_name,
    graph_summary_path,
    matrix_path,
    node_table_path,
    partners_path,
    pca_results_path,
    subgraph_object_path,
    threshold_tag,
)
from mechscope.cooccurrence.pca_results import PCAResults
from mechscope.cooccurrence.records import MARK, Partners, SubgraphPCAResult
from mechscope.files import DamagedFile, atomic_write, atomic_write_text, read_json, read_npz, reading

NUL = "\u2400"  # written for "\0", which HDF5 strings cannot hold
Counts = dict[str, dict[float, CooccurrenceCounts]]  # hook name -> threshold -> counts
CHECKPOINT_FIX = "delete it to count from scratch, or choose another results_dir"
MATRIX_FIX = "delete it and run the count stage again, or choose another results_dir"


# ---- count matrices ---------------------------------------------------------------------------------------------


def save_matrix(path: str | Path, matrix: sp.sparray | np.ndarray, dense: bool = False) -> str:
    """Write ``matrix`` to ``path``: a 2-d one as a scipy sparse CSR npz (``scipy.sparse.save_npz``), or with
    ``dense`` as the reference writes it (``np.savez_compressed``, one array ``arr_0``); a 1-d one always dense.
    Returns ``"sparse"`` or ``"dense"``. (:func:`save_counts` calls it on a temporary file that it then renames.)
    """
    if isinstance(matrix, np.ndarray) and (dense or matrix.ndim == 1):
        np.savez_compressed(path, matrix)
        return "dense"
    if dense:
        np.savez_compressed(path, sp.csr_array(matrix).toarray())
        return "dense"
    sp.save_npz(path, sp.csr_array(matrix), compressed=True)
    return "sparse"


def load_matrix(path: str | Path) -> np.ndarray | sp.csr_array:
    """Read a file :func:`save_matrix` (or the reference) wrote: an ndarray when dense, a CSR array when sparse. A
    damaged file raises :class:`~mechscope.files.DamagedFile` naming it."""
    data = read_npz(path, MATRIX_FIX)
    with reading(path, MATRIX_FIX):
        if "format" in data:
            fmt = data["format"].item()
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            shape = tuple(int(s) for s in data["shape"])
            if fmt == "csr":
                return sp.csr_array((data["data"], data["indices"], data["indptr"]), shape=shape)
            if fmt == "coo":
                return sp.csr_array(sp.coo_array((data["data"], (data["row"], data["col"])), shape=shape))
            raise ValueError(f"{path}: unsupported sparse format {fmt!r}; save it as csr or coo")
        return next(iter(data.values()))


def count_files_problem(
    results_dir: str | Path, thresholds: Sequence[float], output_format: str, d_sae: int, n_tokens: int
) -> str | None:
    """What is wrong with the files :func:`save_counts` wrote for ``thresholds`` in ``results_dir`` (missing, not
    readable, not ``[d_sae, d_sae]`` / ``[d_sae]``, or from another count than ``n_tokens`` tokens), or None when
    they are a whole set."""
    out = Path(results_dir)
    try:
        tokens = read_json(out / TOKENS_FILE, MATRIX_FIX)
        for t in thresholds:
            if not isinstance(tokens, dict) or tokens.get(str(float(t))) != n_tokens:
                return f"{out / TOKENS_FILE} does not record {n_tokens} tokens at threshold {t}"
            for kind in KINDS:
                path = out / file_name(kind, t, output_format)
                shape = load_matrix(path).shape
                want = (d_sae,) if kind == "activations" else (d_sae, d_sae)
                if shape != want:
                    return f"{path} holds a {list(shape)} matrix, not {list(want)}"
    except FileNotFoundError as e:
        return f"{e.filename or e} is missing"
    except DamagedFile as e:
        return str(e)
    return None


def save_counts(
    results_dir: str | Path, counts: dict[float, CooccurrenceCounts], output_format: str = "mechscope"
) -> list[Path]:
    """Write the total, Jaccard and activations npz files per threshold, and the token counts, to ``results_dir``.

    ``"mechscope"``: exact files, ``mechscope_cooc_{total,jaccard}_threshold_{t}.npz`` as int64 / float32 CSR and
    ``mechscope_cooc_activations_threshold_{t}.npz`` as int64. ``"sae_cooccurrence"``: the reference's files,
    ``feature_acts_cooc_{total,jaccard,activations}_threshold_{t}.npz``, each one dense float32 array ``arr_0`` (the
    counts are exact below 2**24 tokens). The other format's files of the same thresholds are removed, so a folder
    never holds two versions. ``feature_acts_cooc_n_tokens.json`` maps each threshold to the tokens counted and is
    written last. Returns the paths written.
    """
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense = output_format == "sae_cooccurrence"
    tokens_path = out / TOKENS_FILE
    tokens_path.unlink(missing_ok=True)  # written last: while it is missing, the files are not a finished set
    written = []
    for t, c in tqdm(counts.items(), desc="saving co-occurrence", leave=False):
        matrices = {"total": c.counts, "jaccard": jaccard(c), "activations": c.activations}
        for kind, matrix in matrices.items():
            if dense:
                matrix = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float32)
            path = out / file_name(kind, t, output_format)
            atomic_write(path, partial(save_matrix, matrix=matrix, dense=dense))
            written.append(path)
            for other in FILE_PREFIX:
                if other != output_format:
                    (out / file_name(kind, t, other)).unlink(missing_ok=True)
    atomic_write_text(tokens_path, json.dumps({str(t): c.n_tokens for t, c in counts.items()}, indent=2) + "\n")
    return [*written, tokens_path]


def load_counts(results_dir: str | Path, threshold: float) -> CooccurrenceCounts:
    """Read back the counts :func:`save_counts` wrote for ``threshold`` (in either format, or mechscope's older
    files)."""
    out = Path(results_dir)
    tokens = json.loads((out / TOKENS_FILE).read_text())
    key = str(float(threshold))
    if key not in tokens:
        raise KeyError(f"no counts for threshold {threshold} in {out / TOKENS_FILE}; found {sorted(tokens)}")
    matrix = load_matrix(matrix_path(out, "total", threshold))
    return CooccurrenceCounts(float(threshold), sp.csr_array(matrix, dtype=np.int64), int(tokens[key]))


def load_jaccard(results_dir: str | Path, threshold: float) -> np.ndarray | sp.csr_array:
    """The Jaccard matrix :func:`save_counts` wrote for ``threshold`` (in either format)."""
    return load_matrix(matrix_path(results_dir, "jaccard", threshold))


# ---- the count checkpoint ---------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, state: dict[str, Any], counts: Counts) -> None:
    """Write ``state`` (JSON: settings, ``sae_ids`` (the hook names), ``thresholds``, counters, where the next batch
    starts) and every count matrix (int64 CSR arrays ``{s}_{i}_data/indices/indptr`` for hook ``s`` and threshold
    ``i``) to ``path`` as one npz, atomically."""
    arrays: dict[str, Any] = {"state": np.array(json.dumps(state))}
    for s, hook in enumerate(state["sae_ids"]):
        for i, t in enumerate(state["thresholds"]):
            m = sp.csr_array(counts[hook][t].counts)
            arrays.update({f"{s}_{i}_data": m.data, f"{s}_{i}_indices": m.indices, f"{s}_{i}_indptr": m.indptr})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The ``state`` of a checkpoint :func:`save_checkpoint` wrote, without its matrices; a damaged file raises
    :class:`~mechscope.files.DamagedFile` naming it."""
    # the file is opened here, not by np.load, which leaves it open when a truncated archive fails to parse
    with reading(path, CHECKPOINT_FIX), open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        state: dict[str, Any] = json.loads(data["state"].item())
        missing = {"settings", "sae_ids", "thresholds", "batches_done", "n_tokens", "next"} - set(state)
        if missing:
            raise KeyError(f"state {sorted(missing)}")
    return state


def load_checkpoint(path: str | Path, d_sae: dict[str, int]) -> tuple[dict[str, Any], Counts]:
    """``(state, counts)`` of a checkpoint :func:`save_checkpoint` wrote; ``d_sae`` sizes each hook's matrices. A
    damaged file raises :class:`~mechscope.files.DamagedFile` naming it."""
    data = read_npz(path, CHECKPOINT_FIX)
    with reading(path, CHECKPOINT_FIX):
        state = json.loads(data["state"].item())
        counts: Counts = {}
        for s, hook in enumerate(state["sae_ids"]):
            n = d_sae[hook]
            counts[hook] = {
                float(t): CooccurrenceCounts(
                    float(t),
                    sp.csr_array((data[f"{s}_{i}_data"], data[f"{s}_{i}_indices"], data[f"{s}_{i}_indptr"]), (n, n)),
                    state["n_tokens"],
                )
                for i, t in enumerate(state["thresholds"])
            }
    return state, counts


# ---- graphs -----------------------------------------------------------------------------------------------------


def write_node_table(rows: list[dict[str, Any]], csv_path: str | Path, parquet_path: str | Path) -> None:
    """Write ``node_table`` rows as CSV (lines end in ``\\n``, as pandas writes them) and as Parquet (pyarrow). List
    columns (the token lists) are Parquet ``list<string>`` columns, and JSON arrays in the CSV (``[" the", " a"]``:
    ``json.loads`` reads them back, and so does the reference's ``ast.literal_eval``)."""
    table = pa.Table.from_pylist(rows)
    atomic_write(parquet_path, lambda tmp: pq.write_table(table, tmp))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in row.items()})
    atomic_write(csv_path, lambda tmp: tmp.write_bytes(text.getvalue().encode("utf-8")))


def size_histogram(sizes: Sequence[int], path: str | Path, activity_threshold: float) -> Path:
    """Save a PNG histogram (one bar per size, log count axis) of the sizes of the subgraphs of more than one latent
    (``sizes``: one entry per subgraph, singletons included); return ``path``. Uses matplotlib's Agg canvas directly,
    so pyplot's global backend is left alone."""
    big = np.array([s for s in sizes if s > 1], dtype=np.int64)
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(big):
        ax.hist(big, bins=np.arange(1.5, big.max() + 1.5).tolist(), log=True, color="#4c72b0")
        ax.set_ylim(bottom=0.7)
    else:
        ax.text(0.5, 0.5, "no subgraph of more than one latent", transform=ax.transAxes, ha="center")
    ax.set_xlabel("subgraph size (latents)")
    ax.set_ylabel("subgraphs")
    ax.set_title(f"Subgraph sizes at activity threshold {activity_threshold}: {len(big)} of more than one latent")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def thresholded_matrix(graphs: GraphResults) -> np.ndarray:
    """``[d_sae, d_sae]`` float32: the Jaccard matrix of the graph's edges, as the reference's graph stage keeps it
    (``remove_low_weight_edges`` after ``remove_self_loops_inplace``): ``J_ij`` where ``i - j`` is an edge, else 0
    (the diagonal too)."""
    n = len(graphs.feature_activations)
    out = np.zeros((n, n), dtype=np.float32)
    for sub in graphs.subgraphs:
        if sub.edges:
            i, j = np.array(sub.edges, dtype=np.int64).T
            out[i, j] = out[j, i] = np.array(sub.weights, dtype=np.float32)
    return out


def save_edge_thresholds(results_dir: str | Path, activity_threshold: float, edge_threshold: float) -> Path:
    """Set the row of ``activity_threshold`` in ``results_dir/edge_thresholds.csv``, the reference's table of edge
    thresholds (columns ``activation_threshold``, ``edge_threshold``; rows by activity threshold); return its
    path."""
    path = Path(results_dir) / EDGE_THRESHOLDS
    rows = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            rows = {float(r["activation_threshold"]): float(r["edge_threshold"]) for r in csv.DictReader(f)}
    rows[float(activity_threshold)] = float(edge_threshold)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["activation_threshold", "edge_threshold"])
    writer.writerows([repr(t), repr(e)] for t, e in sorted(rows.items()))
    return atomic_write_text(path, text.getvalue())


def save_graphs(
    results_dir: str | Path,
    graphs: GraphResults,
    *,
    skip_subgraph_files: bool = False,
    output_format: str = "mechscope",
) -> dict[str, Any]:
    """Write the graph stage's outputs for one activity threshold (:func:`~mechscope.cooccurrence.graph_results`)
    and return its summary, also written as JSON.

    Under ``results_dir`` (``t`` is the threshold with ``.`` as ``_``):

    - ``subgraph_objects/activation_{t}/subgraph_{id}.json``: ``{"id", "nodes", "edges", "weights"}`` of every
      subgraph of more than one latent (not with ``skip_subgraph_files``);
    - ``dataframes/node_info_df_{t}.csv`` and ``.parquet``: the node table (see :func:`write_node_table`);
    - ``dataframes/top_cooccurring_{t}.npz``: ``graphs.partners`` (see :func:`save_partners`), when computed;
    - ``subgraph_sizes_{t}.png``: the histogram of subgraph sizes;
    - ``graph_summary_{t}.json``: ``graphs.summary`` plus ``histogram`` (the image's path);
    - with ``output_format="sae_cooccurrence"`` also the reference's ``edge_thresholds.csv`` (this threshold's row,
      :func:`save_edge_thresholds`) and ``thresholded_matrices/thresholded_matrix_{t}.npz`` (dense float32,
      :func:`thresholded_matrix`) and ``sparse_thresholded_matrix_{t}.npz`` (the same as a scipy CSR npz).
    """
    if output_format not in FILE_PREFIX:
        raise ValueError(f"output_format must be one of {tuple(FILE_PREFIX)}, not {output_format!r}")
    out, t = Path(results_dir), graphs.activity_threshold
    tag = threshold_tag(t)
    subs = graphs.subgraphs
    if not skip_subgraph_files:
        sub_dir = subgraph_object_path(out, t, 0).parent
        sub_dir.mkdir(parents=True, exist_ok=True)
        for stale in sub_dir.glob("subgraph_*.json"):  # from an earlier run, whose subgraphs may differ
            stale.unlink()
        for sub in subs:
            if len(sub.nodes) > 1:
                record = {"id": sub.id, "nodes": sub.nodes, "edges": sub.edges, "weights": sub.weights}
                atomic_write_text(subgraph_object_path(out, t, sub.id), json.dumps(record) + "\n")
    tables = node_table_path(out, t)
    tables.parent.mkdir(parents=True, exist_ok=True)
    write_node_table(graphs.node_table, tables.with_suffix(".csv"), tables)
    if graphs.partners is not None:
        save_partners(partners_path(out, t), graphs.partners)
    if output_format == "sae_cooccurrence":
        save_edge_thresholds(out, t, graphs.summary["edge_threshold"])
        dense = thresholded_matrix(graphs)
        folder = out / "thresholded_matrices"
        folder.mkdir(exist_ok=True)
        atomic_write(folder / f"thresholded_matrix_{tag}.npz", lambda tmp: np.savez_compressed(tmp, dense))
        sparse = sp.csr_matrix(dense)  # the matrix class, as the reference saves it
        atomic_write(folder / f"sparse_thresholded_matrix_{tag}.npz", lambda tmp: sp.save_npz(tmp, sparse))
    histogram = size_histogram([len(s.nodes) for s in subs], out / f"subgraph_sizes_{tag}.png", t)
    result = {**graphs.summary, "histogram": str(histogram)}
    atomic_write_text(graph_summary_path(out, t), json.dumps(result, indent=2) + "\n")
    return result


def save_partners(path: str | Path, partners: Partners) -> Path:
    """Write :class:`~mechscope.cooccurrence.records.Partners` as an ``.npz`` of ``latents`` and ``jaccard``
    ``[d_sae, n]`` (no pickled objects); return ``path``."""
    return atomic_write(path, lambda tmp: np.savez(tmp, latents=partners.latents, jaccard=partners.jaccard))


def save_summaries(results_dir: str | Path, summaries: dict[str, dict[float, dict[str, Any]]]) -> Path:
    """Write ``{hook: {threshold: graph summary}}`` to ``results_dir/summary.json``; return its path."""
    by_name = {k: {str(t): v for t, v in by_t.items()} for k, by_t in summaries.items()}
    return atomic_write_text(Path(results_dir) / SUMMARY, json.dumps(by_name, indent=2, default=str))


# ---- PCA results ------------------------------------------------------------------------------------------------


def _write_strings(g: h5py.Group, name: str, data: str | list[str]) -> None:
    """A fixed-length UTF-8 string dataset (scalar for one string), as the reference writes its strings: read with
    h5py it gives bytes (numpy ``S``), which the reference app's readers decode to text (variable-length strings
    come back as an object array they leave as bytes). NUL, which these strings cannot hold, is written as U+2400
    (the visible symbol for it)."""
    items = [data] if isinstance(data, str) else data
    encoded = [x.replace("\0", NUL).encode("utf-8") for x in items]
    dtype = h5py.string_dtype("utf-8", max([1, *map(len, encoded)]))
    array = np.array(encoded[0] if isinstance(data, str) else encoded, dtype=dtype)
    g.create_dataset(name, data=array)


def _write_group(f: h5py.File, result: SubgraphPCAResult) -> None:
    pca = result.pca
    g = f.create_group(f"subgraph_{result.subgraph_id}")
    g.attrs["subgraph_id"] = result.subgraph_id
    g.create_dataset("nodes", data=np.asarray(pca.nodes, dtype=np.int64))
    table = g.create_group("pca_df")
    for k in range(pca.coords.shape[1]):
        table.create_dataset(f"PC{k + 1}", data=pca.coords[:, k])
    _write_strings(table, "tokens", result.tokens)
    _write_strings(table, "context", result.contexts)
    table.create_dataset("point_id", data=pca.token_index)
    where = g.create_group("all_token_dfs")
    where.create_dataset("batch", data=result.context_id)
    where.create_dataset("pos", data=result.position)
    where.create_dataset("token_id", data=result.token_id)
    g.create_dataset("all_graph_feature_acts", data=pca.activations)
    info = np.stack([pca.top_value, pca.top_index, pca.top_in_subgraph], axis=1).astype(np.float64)
    g.create_dataset("all_max_feature_info", data=info)
    g.create_dataset("all_examples_found", data=len(pca.token_index))
    g.create_dataset("components", data=pca.components)
    g.create_dataset("explained_variance_ratio", data=pca.explained_variance_ratio)
    _write_strings(g, "top_3_tokens", result.top_tokens)
    g.create_dataset("top_3_token_counts", data=np.asarray(result.top_token_counts, dtype=np.int64))
    _write_strings(g, "example_context", result.example_context)


def save_pca_results(results_dir: str | Path, results: PCAResults) -> list[Path]:
    """Write one HDF5 file per candidate size of ``results`` (:func:`~mechscope.cooccurrence.subgraph_pca_results`)
    to :func:`pca_results_path`, one group per subgraph, and return their paths (in size order).

    Strings are fixed-length UTF-8 HDF5 strings, as the reference writes them; nothing is pickled. The layout is in
    ``docs/cooccurrence.md``.
    """
    paths = []
    for size, found in results.by_size.items():
        path = pca_results_path(results_dir, size, results.activity_threshold)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path, size: int = size, found: list[SubgraphPCAResult] = found) -> None:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(
                    subgraph_size=size,
                    activity_threshold=results.activity_threshold,
                    max_examples=results.max_examples,
                    n_components=results.n_components,
                    context_window=results.context_window,
                    context_mark=MARK,
                )
                for result in found:
                    _write_group(f, result)

        paths.append(atomic_write(path, write))
    return paths
