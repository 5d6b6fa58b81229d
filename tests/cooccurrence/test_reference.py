"""mechscope's co-occurrence counts, graphs and files against what sae_cooccurrence's own code computed and wrote.

``data/sae_cooccurrence/`` holds a small SAE whose decoder rows have norms 0.25 to 4, three batches of its input
activations, and what the reference made of them (``sae_cooccurrence_reference.py`` regenerates it from a
checkout): its counts after ``fold_W_dec_norm``, its files (``feature_acts_cooc_*``, ``edge_thresholds.csv``,
``thresholded_matrices/``, the node tables, a PCA results file) and what its app's HDF5 readers returned. The tests
run mechscope on the same weights and activations and compare numbers and files with those.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from mechscope.cooccurrence import (
    count_cooccurrences,
    edge_threshold,
    graph_results,
    jaccard,
    latent_tokens,
    load_counts,
    load_pca_results,
    save_counts,
    save_graphs,
    save_pca_results,
    subgraph_pca_results,
    subgraphs,
)
from mechscope.cooccurrence.pipeline import encode
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.sae import SAEConfig, SparseAutoencoder

DATA = Path(__file__).parent / "data" / "sae_cooccurrence"
FILES = DATA / "files"
REF = json.loads((DATA / "values.json").read_text(encoding="utf-8"))
THRESHOLDS = REF["thresholds"]
STRING_DATASETS = ("pca_df/tokens", "pca_df/context", "top_3_tokens", "example_context")  # what its app reads


@pytest.fixture(scope="module")
def values() -> dict[str, torch.Tensor]:
    return load_file(DATA / "values.safetensors")


@pytest.fixture(scope="module")
def sae(values) -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=values["W_enc"].shape[0],
        d_sae=values["W_enc"].shape[1],
        architecture="relu",
        model_name=REF["model_name"],
        neuronpedia_id=REF["neuronpedia_id"],
    )
    weights = {name: values[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return SparseAutoencoder.from_tensors(cfg, weights).eval()


def mechscope_counts(sae: SparseAutoencoder, x: torch.Tensor, fold: bool) -> dict:
    """What the pipeline's count stage does with each batch of rows: encode (folding or not), then count."""
    return count_cooccurrences([encode(sae, batch, fold) for batch in x], THRESHOLDS, d_sae=sae.cfg.d_sae)


class VocabTokenizer:
    """Decodes ids to the fixture's vocabulary strings, as the reference's stand-in tokenizer did."""

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return ["".join(REF["vocab"][i] for i in row) for row in ids]


def test_the_fixture_sae_has_decoder_rows_far_from_unit_norm(values):
    norms = values["W_dec"].norm(dim=-1)
    assert float(norms.min()) < 0.4 and float(norms.max()) > 3
    torch.testing.assert_close(values["folded/W_dec"].norm(dim=-1), torch.ones(len(norms)))
    torch.testing.assert_close(values["folded/W_enc"], values["W_enc"] * norms)  # what fold_W_dec_norm did


def test_counts_fold_decoder_norms_as_the_reference(sae, values):
    folded = mechscope_counts(sae, values["x"], fold=True)
    raw = mechscope_counts(sae, values["x"], fold=False)
    for t in THRESHOLDS:
        reference = values[f"total/{t}"].numpy()
        assert reference.dtype == np.float32 and np.all(reference == np.round(reference))
        np.testing.assert_array_equal(folded[t].counts.toarray(), reference)
        if t > 0:  # the raw activations cross other thresholds: the counts before this option existed differ
            assert np.abs(raw[t].counts.toarray() - reference).max() >= 10
        else:  # a positive scale keeps which activations are > 0
            np.testing.assert_array_equal(raw[t].counts.toarray(), reference)


@pytest.fixture(scope="module")
def written(sae, values, tmp_path_factory) -> Path:
    """mechscope's count and graph files in the reference's format, from the same SAE and activations, with the
    reference's bisection edge threshold and its graph settings."""
    out = tmp_path_factory.mktemp("reference_format")
    counts = mechscope_counts(sae, values["x"], fold=True)
    save_counts(out, counts, "sae_cooccurrence")
    w_e = values["W_E"]
    tokens = latent_tokens(sae.W_dec, w_e, w_e.T, VocabTokenizer(), k=10)
    for t, c in counts.items():
        j = jaccard(c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bisection may end above max_size, as the reference's does
            edge = edge_threshold(j, REF["min_size"], REF["max_size"], method="bisection")
        graphs = graph_results(
            subgraphs(j, edge.threshold),
            t,
            edge,
            c.activations,
            c.n_tokens,
            include_metrics=True,
            tokens=tokens,
            neuronpedia_id=sae.cfg.neuronpedia_id,
        )
        save_graphs(out, graphs, output_format="sae_cooccurrence")
    return out


def test_dense_count_files_equal_the_references(written):
    names = sorted(p.name for p in FILES.glob("feature_acts_cooc_*.npz"))
    assert len(names) == 3 * len(THRESHOLDS)
    for name in names:
        with np.load(FILES / name, allow_pickle=False) as ref, np.load(written / name, allow_pickle=False) as got:
            assert got.files == ref.files == ["arr_0"]
            assert (got["arr_0"].dtype, got["arr_0"].shape) == (ref["arr_0"].dtype, ref["arr_0"].shape)
            np.testing.assert_array_equal(got["arr_0"], ref["arr_0"])


def test_jaccard_diagonal_is_zero_for_a_latent_that_never_fires(written):
    never = REF["never_fires"]
    for t in THRESHOLDS:
        tag = str(t).replace(".", "_")
        with np.load(FILES / f"feature_acts_cooc_jaccard_threshold_{tag}.npz") as ref:
            diagonal = np.diag(ref["arr_0"])
        with np.load(FILES / f"feature_acts_cooc_activations_threshold_{tag}.npz") as acts:
            fired = acts["arr_0"] > 0
        assert not fired[never] and diagonal[never] == 0
        np.testing.assert_array_equal(diagonal, fired.astype(np.float32))  # 1 for the others
        got = np.diag(jaccard(sp.diags_array(np.where(fired, 5, 0), dtype=np.int64)).toarray())
        np.testing.assert_array_equal(got, diagonal)


def test_bisection_edge_thresholds_and_their_files_equal_the_references(written):
    def read(path: Path) -> tuple[list[str], dict[float, float]]:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        return rows[0], {float(a): float(e) for a, e in rows[1:]}

    header, ref = read(FILES / "edge_thresholds.csv")
    assert read(written / "edge_thresholds.csv") == (header, ref)  # rows in another order: the reference's is a dict's
    assert ref == {float(t): v for t, (v, _) in REF["edge_thresholds"].items()}
    for path in sorted((FILES / "thresholded_matrices").glob("thresholded_matrix_*.npz")):
        with np.load(path) as a, np.load(written / "thresholded_matrices" / path.name) as b:
            assert b.files == a.files == ["arr_0"] and b["arr_0"].dtype == a["arr_0"].dtype == np.float32
            np.testing.assert_array_equal(b["arr_0"], a["arr_0"])
        sparse = "sparse_" + path.name
        ref_sparse = sp.load_npz(FILES / "thresholded_matrices" / sparse)
        got_sparse = sp.load_npz(written / "thresholded_matrices" / sparse)
        assert got_sparse.format == ref_sparse.format == "csr"
        np.testing.assert_array_equal(got_sparse.toarray(), ref_sparse.toarray())


def quicklist_features(url: str) -> list[dict]:
    return json.loads(parse_qs(urlsplit(url).query)["features"][0])


def test_node_tables_have_the_references_columns_order_and_values(written):
    for path in sorted((FILES / "dataframes").glob("node_info_df_*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            ref = list(csv.DictReader(f))
        with (written / "dataframes" / path.name).open(newline="", encoding="utf-8") as f:
            got = list(csv.DictReader(f))
        assert (written / "dataframes" / path.name).read_bytes().count(b"\r\n") == 0  # pandas's line ends
        ref_columns = list(ref[0])
        assert list(got[0]) == [*ref_columns, "top_output_tokens"]
        assert "quicklist_link" in ref_columns
        by_node = {row["node_id"]: row for row in got}
        assert sorted(by_node) == sorted(row["node_id"] for row in ref)
        for want in ref:
            row = by_node[want["node_id"]]
            for key in ("activity_threshold", "subgraph_id", "subgraph_size", "feature_activations", "diameter"):
                assert float(row[key]) == float(want[key]), (key, row, want)
            scores = [k for k in ref_columns if k.endswith(("_score", "density", "_ratio", "_clustering"))]
            assert [float(row[k]) for k in scores] == pytest.approx([float(want[k]) for k in scores], abs=1e-12)
            # the reference writes Python list reprs and mechscope JSON arrays: ast.literal_eval reads both
            assert ast.literal_eval(row["top_10_tokens"]) == ast.literal_eval(want["top_10_tokens"])
            assert row["neuronpedia_link"] == want["neuronpedia_link"]
            # the same features per link; the reference lists a subgraph in networkx's set order, mechscope ascending
            got_features, ref_features = (quicklist_features(r["quicklist_link"]) for r in (row, want))
            assert sorted(got_features, key=lambda f: int(f["index"])) == sorted(
                ref_features, key=lambda f: int(f["index"])
            )
            assert row["quicklist_link"].split("&features=")[0] == want["quicklist_link"].split("&features=")[0]
            if int(want["subgraph_size"]) == 1:
                assert row["quicklist_link"] == want["quicklist_link"]


def mechscope_pca_file(tmp_path: Path) -> Path:
    """A PCA results file of one subgraph over a text with non-ASCII characters (byte tokenizer)."""
    tok = byte_tokenizer()
    ids = tok("le café d'été, « déjà » |x|", add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(len(ids), 6, generator=g))
    n = torch.tensor(ids)
    candidates = {3: [subgraphs(np.ones((3, 3)), 0.5)[0]]}
    results = subgraph_pca_results(
        candidates, [acts], n, torch.zeros_like(n), torch.arange(len(ids)), torch.randn(6, 4, generator=g), tok, 1.5
    )
    return save_pca_results(tmp_path, results)[0]


def test_pca_strings_are_bytes_as_the_references_so_its_app_reads_text(tmp_path):
    path = mechscope_pca_file(tmp_path)
    ref_path = next((FILES / "pca").glob("*.h5"))
    with h5py.File(ref_path) as ref, h5py.File(path) as got:
        ref_group, got_group = ref[next(iter(ref))], got[next(iter(got))]
        for name in STRING_DATASETS:
            assert ref_group[name].dtype.str == REF["pca"]["h5_dtypes"][name]
            # fixed-length strings: h5py gives numpy bytes ("S"), which the app's decode_if_bytes decodes
            assert got_group[name].dtype.kind == ref_group[name].dtype.kind == "S"
        read_back = load_pca_results(path)[0]
        tokens = [b.decode("utf-8") for b in got_group["pca_df/tokens"][()]]
        assert tokens == read_back.tokens and any(not t.isascii() for t in tokens)
        assert [b.decode("utf-8") for b in got_group["pca_df/context"][()]] == read_back.contexts
        assert got_group["example_context"][()].decode("utf-8") == read_back.example_context
    assert REF["pca"]["app_tokens"] == REF["pca"]["fired_tokens"]  # what the app read from the reference's file
    assert set(REF["pca"]["app_types"]) <= {"str", "str_"}


@pytest.mark.skipif(
    not (os.environ.get("SAE_COOCCURRENCE_PYTHON") and os.environ.get("SAE_COOCCURRENCE_SRC")),
    reason="needs the reference's side venv: set SAE_COOCCURRENCE_PYTHON and SAE_COOCCURRENCE_SRC "
    "(see sae_cooccurrence_reference.py)",
)
def test_reference_readers_read_mechscope_files(written, tmp_path):
    """The reference's own readers on mechscope's files: its loaders get the matrices, its app gets text."""
    path = mechscope_pca_file(written)
    report_path = tmp_path / "report.json"
    script = Path(__file__).with_name("sae_cooccurrence_reference.py")
    src = os.environ["SAE_COOCCURRENCE_SRC"]
    command = [os.environ["SAE_COOCCURRENCE_PYTHON"], str(script), "--src", src]
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([*command, "--check-readers", str(written), "--out", str(report_path)], check=True, env=env)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    for kind in ("total", "jaccard", "activations"):
        found = report["matrices"][kind]
        assert sorted(found) == sorted(str(t) for t in THRESHOLDS)
        for t, matrix in found.items():
            tag = t.replace(".", "_")
            with np.load(written / f"feature_acts_cooc_{kind}_threshold_{tag}.npz") as f:
                np.testing.assert_array_equal(np.array(matrix["values"], dtype=np.float32), f["arr_0"])
    assert len(report["thresholded"]) == len(THRESHOLDS) and len(report["node_tables"]) == len(THRESHOLDS)
    pca, mine = report["pca"][path.name]["0"], load_pca_results(path)[0]
    assert set(pca["types"]) <= {"str", "str_"}  # text, not bytes
    assert (pca["tokens"], pca["context"]) == (mine.tokens, mine.contexts)
    assert (pca["top_3_tokens"], pca["example_context"]) == (mine.top_tokens, mine.example_context)
    for name, table in report["node_tables"].items():
        with (FILES / "dataframes" / name).open(newline="", encoding="utf-8") as f:
            assert table["columns"] == [*next(csv.reader(f)), "top_output_tokens"]
    # mechscope's own format: the reference's loader finds no file instead of reading a sparse file's index vector
    native = tmp_path / "native"
    save_counts(native, {t: load_counts(written, t) for t in THRESHOLDS})
    subprocess.run([*command, "--check-readers", str(native), "--out", str(report_path)], check=True, env=env)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert all("No files found" in report["matrices"][k]["error"] for k in ("total", "jaccard", "activations"))
