"""Regenerate ``tests/cooccurrence/data/sae_cooccurrence/``: values and files of sae_cooccurrence's own code.

The co-occurrence reference tests (``tests/cooccurrence/test_reference.py``) compare mechscope with what
MClarke1991/sae_cooccurrence computes and writes on a small random SAE whose decoder rows are far from unit norm.
The reference is not on PyPI; it needs sae-lens 3.x (and with it TransformerLens 2.x), so it runs in a side venv
with a checkout of it (its ``sae_cooccurrence`` package and ``src/`` scripts):

    python3.11 -m venv /work/venv-cooc
    /work/venv-cooc/bin/pip install torch==2.13.0 sae-lens==3.23.4 "pyarrow<18" pyvis h5py streamlit psutil plotly
    PYTHONPATH=CHECKOUT /work/venv-cooc/bin/python tests/cooccurrence/sae_cooccurrence_reference.py --src CHECKOUT

It imports nothing of mechscope. It builds a SAELens ``SAE`` (ReLU, d_in 8, d_sae 24) from seeded weights, folds
its decoder norms as the reference's loaders do (``sae.fold_W_dec_norm()``), and runs the reference's own
functions: ``compute_cooccurrence_matrices`` over three fixed batches of activations (a stand-in for the
``ActivationsStore`` that hands them out in order), ``calculate_jaccard_matrices_chunked`` and its writers, then
``src/2_generate_graphs_loop.py``'s ``process_matrices`` (bisection edge thresholds, ``edge_thresholds.csv``,
thresholded matrices, node tables with metrics and links), and ``src/4_pca_for_streamlit.py``'s
``save_results_to_hdf5`` on one subgraph's examples. What it writes goes to ``files/``; the weights, inputs and
counts to ``values.safetensors``; and what the reference app's readers (``sae_cooccurrence.streamlit``) return on
its HDF5 file, to ``values.json``.

``--check-readers DIR --out FILE`` instead runs the reference's readers (``load_npz_files``, the streamlit
loaders, ``pd.read_csv`` + ``ast.literal_eval`` of the node tables) on a results folder that mechscope wrote, and
writes what they returned as JSON; the test ``test_reference_readers_read_mechscope_files`` drives it when
``SAE_COOCCURRENCE_PYTHON`` and ``SAE_COOCCURRENCE_SRC`` name the side venv's python and the checkout.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).parent / "data" / "sae_cooccurrence"
D_IN, D_SAE, N_BATCHES, BATCH = 8, 24, 3, 64
THRESHOLDS = [0.0, 0.5, 1.5]
MIN_SIZE, MAX_SIZE = 3, 6
NEVER = 5  # a latent whose encoder bias keeps it silent: the Jaccard diagonal of a never-firing latent
NEURONPEDIA_ID, MODEL_NAME = "gpt2-small/0-res-jb", "gpt2-small"
# token strings of varied length, with quotes, commas, a non-ASCII letter and a "|", as real vocabularies have
VOCAB = [" the", ",", " a", "é", "'s", ' "', "ing", " of", "|", "\n", " Paris", "tion", " x", "1", " été", " 2024"]
VOCAB += [f" w{i}" for i in range(40 - len(VOCAB))]
LOAD_OPTIONS = {  # the reference app's [processing.load_options] (src/config_pca_streamlit.toml)
    "fired_tokens": False,
    "reconstructions": False,
    "graph_feature_acts": True,
    "feature_acts": False,
    "max_feature_info": True,
    "examples_found": False,
    "token_dfs": False,
}
SAVE_OPTIONS = {  # its [processing.save_options]
    "fired_tokens": False,
    "top_3_tokens": True,
    "context": True,
    "reconstructions": False,
    "graph_feature_acts": True,
    "feature_acts": False,
    "max_feature_info": True,
    "examples_found": False,
    "token_dfs": False,
    "pca": True,
}


def _script(src: Path, name: str) -> types.ModuleType:
    """One of the reference's ``src/`` scripts (file names starting with a digit) as a module."""
    spec = importlib.util.spec_from_file_location(name, src / "src" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights() -> dict[str, torch.Tensor]:
    """Seeded SAE weights: six groups of four latents with related encoder columns (so subgraphs form), decoder
    rows of norm 0.25 to 4, one latent that never fires; and the activations of three batches."""
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(D_IN, D_SAE // 4, generator=g)
    w_enc = base.repeat_interleave(4, dim=1) + 0.6 * torch.randn(D_IN, D_SAE, generator=g)
    w_enc = w_enc / D_IN**0.5
    b_enc = -0.8 + 0.3 * torch.randn(D_SAE, generator=g)
    b_enc[NEVER] = -1000.0
    directions = torch.randn(D_SAE, D_IN, generator=g)
    norms = 0.25 * 16 ** torch.rand(D_SAE, generator=g)  # log-uniform in [0.25, 4]
    w_dec = directions / directions.norm(dim=-1, keepdim=True) * norms[:, None]
    b_dec = 0.1 * torch.randn(D_IN, generator=g)
    x = 1.5 * torch.randn(N_BATCHES, BATCH, D_IN, generator=g)
    w_e = torch.randn(len(VOCAB), D_IN, generator=g)
    return {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec, "x": x, "W_E": w_e}


def saelens_sae(w: dict[str, torch.Tensor]) -> Any:
    from sae_lens import SAE
    from sae_lens.sae import SAEConfig

    cfg = SAEConfig(
        architecture="standard",
        d_in=D_IN,
        d_sae=D_SAE,
        activation_fn_str="relu",
        apply_b_dec_to_input=True,
        finetuning_scaling_factor=False,
        context_size=16,
        model_name=MODEL_NAME,
        hook_name="blocks.0.hook_resid_pre",
        hook_layer=0,
        hook_head_index=None,
        prepend_bos=True,
        dataset_path="",
        dataset_trust_remote_code=False,
        normalize_activations="none",
        dtype="float32",
        device="cpu",
        sae_lens_training_version=None,
        neuronpedia_id=NEURONPEDIA_ID,
    )
    sae = SAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name])
    return sae


class Batches:
    """The part of SAELens's ``ActivationsStore`` that ``compute_cooccurrence_matrices`` uses: ``next_batch()``
    hands out the fixed batches in order, as ``[batch, 1, d_in]`` as the store does."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.i = x, 0

    def next_batch(self) -> torch.Tensor:
        self.i += 1
        return self.x[self.i - 1].unsqueeze(1)


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(VOCAB[i] for i in ids)


def generate(src: Path, commit: str | None) -> None:
    import h5py
    import pandas as pd
    import sae_cooccurrence.normalised_cooc_functions as cooc
    import sae_cooccurrence.pca as ref_pca
    import sae_cooccurrence.streamlit as app
    import sae_lens
    from sae_cooccurrence.graph_generation import calculate_token_factors_inds_efficient, create_decode_tokens_function
    from safetensors.torch import save_file

    graphs_loop = _script(src, "2_generate_graphs_loop")
    pca_script = _script(src, "4_pca_for_streamlit")
    torch.set_grad_enabled(False)
    w = weights()
    if OUT.exists():
        shutil.rmtree(OUT)
    files = OUT / "files"
    files.mkdir(parents=True)

    sae = saelens_sae(w)
    sae.fold_W_dec_norm()  # as load_model_and_sae and generate_normalised_features do
    with contextlib.redirect_stdout(io.StringIO()):
        total = cooc.compute_cooccurrence_matrices(
            sae=sae,
            activation_store=Batches(w["x"]),
            n_batches=N_BATCHES,
            activation_thresholds=THRESHOLDS,
            device="cpu",
            remove_special_tokens_acts=False,
            special_tokens=set(),
        )
        cooc.save_cooccurrence_matrices(total, "total", THRESHOLDS, str(files))
        activations = cooc.generate_feature_activations(total)
        cooc.save_feature_activations(activations, THRESHOLDS, str(files))
        jaccard = cooc.calculate_jaccard_matrices_chunked(total, device="cpu")
        cooc.save_cooccurrence_matrices(jaccard, "jaccard", THRESHOLDS, str(files))

        # the graph stage, as process_sae_for_graph runs it after loading the files it needs
        model = types.SimpleNamespace(W_E=w["W_E"], tokenizer=Tokenizer())
        config = {
            "analysis": {
                "min_subgraph_size": MIN_SIZE,
                "max_subgraph_size": MAX_SIZE,
                "include_metrics": True,
                "skip_subgraph_plots": True,
                "skip_subgraph_pickles": True,
                "min_subgraph_size_to_plot": 2,
            }
        }
        graphs_loop.create_directories(str(files))
        feature_activations, matrices = graphs_loop.load_data(str(files))
        graphs_loop.process_matrices(
            matrices,
            config,
            str(files),
            feature_activations,
            calculate_token_factors_inds_efficient(model, sae),
            create_decode_tokens_function(model),
            sae,
        )
        shutil.rmtree(files / "histograms")  # matplotlib images, not compared
        edges = {t: graphs_loop.find_threshold(matrices[t], MIN_SIZE, MAX_SIZE) for t in THRESHOLDS}

    # one subgraph's PCA examples, written by the PCA script's own writer and read by the app's loaders
    g = torch.Generator().manual_seed(7)
    n, nodes = 12, [0, 1, 2]
    fired = [VOCAB[i] for i in torch.randint(0, 16, (n,), generator=g).tolist()]
    token_df = pd.DataFrame({"str_tokens": fired, "context": [f"ctx {i} |{t}| é" for i, t in enumerate(fired)]})
    top_3, example = ref_pca.get_top_tokens_and_context(fired, token_df)
    results = ref_pca.ProcessedExamples(
        all_token_dfs=token_df,
        all_fired_tokens=fired,
        all_reconstructions=torch.randn(n, D_IN, generator=g),
        all_graph_feature_acts=torch.rand(n, len(nodes), generator=g),
        all_feature_acts=torch.rand(n, D_SAE, generator=g),
        all_max_feature_info=torch.rand(n, 3, generator=g),
        all_examples_found=n,
        top_3_tokens=top_3,
        example_context=example,
    )
    pca_df, _ = ref_pca.perform_pca_on_results(results, n_components=3, method="full")
    h5_path = files / "pca" / "5000cap_graph_analysis_results_size_3_nbatch_4.h5"
    h5_path.parent.mkdir()
    pca_script.save_results_to_hdf5(str(h5_path), {7: (results, pca_df)}, SAVE_OPTIONS)

    app_top, app_context = app.load_subgraph_metadata(str(h5_path), 7)
    _, app_df = app.load_subgraph_data(str(h5_path), 7, LOAD_OPTIONS)
    with h5py.File(h5_path, "r") as f:
        dtypes = {name: f["subgraph_7"][name].dtype.str for name in ("top_3_tokens", "example_context")}
        dtypes.update({f"pca_df/{c}": f["subgraph_7/pca_df"][c].dtype.str for c in ("tokens", "context")})

    save_file(
        {
            **{k: v.contiguous() for k, v in w.items()},
            "folded/W_enc": sae.W_enc.contiguous(),
            "folded/b_enc": sae.b_enc.contiguous(),
            "folded/W_dec": sae.W_dec.contiguous(),
            **{f"total/{t}": total[t].contiguous() for t in THRESHOLDS},
        },
        str(OUT / "values.safetensors"),
    )
    if commit is None:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    record = {
        "sae_cooccurrence_commit": commit.strip() or "unknown (not a git checkout)",
        "sae_lens": sae_lens.__version__,
        "thresholds": THRESHOLDS,
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        "never_fires": NEVER,
        "neuronpedia_id": NEURONPEDIA_ID,
        "model_name": MODEL_NAME,
        "vocab": VOCAB,
        "edge_thresholds": {str(t): [float(e[0]), int(e[1])] for t, e in edges.items()},
        "pca": {
            "nodes": nodes,
            "fired_tokens": fired,
            "contexts": token_df["context"].tolist(),
            "h5_dtypes": dtypes,
            "app_top_3_tokens": [str(x) for x in app_top],
            "app_example_context": str(app_context),
            "app_tokens": [str(x) for x in app_df["tokens"]],
            "app_context": [str(x) for x in app_df["context"]],
            "app_types": sorted({type(x).__name__ for x in [*app_top, *app_df["tokens"], *app_df["context"]]}),
        },
    }
    (OUT / "values.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


def check_readers(directory: Path, out: Path) -> None:
    """What the reference's readers return on a results folder (one hook's) that mechscope wrote."""
    import pandas as pd
    import sae_cooccurrence.streamlit as app
    from sae_cooccurrence.utils.saving_loading import load_npz_files

    report: dict[str, Any] = {"matrices": {}, "thresholded": {}, "node_tables": {}, "pca": {}}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for kind in ("total", "jaccard", "activations"):
            try:
                found = load_npz_files(str(directory), f"feature_acts_cooc_{kind}")
            except ValueError as e:  # what the reference raises when it finds no file of that kind
                report["matrices"][kind] = {"error": str(e)}
                continue
            report["matrices"][kind] = {
                str(t): {"dtype": a.dtype.str, "shape": list(a.shape), "values": a.tolist()} for t, a in found.items()
            }
        edges = directory / "edge_thresholds.csv"
        report["edge_thresholds"] = pd.read_csv(edges).to_dict("list") if edges.exists() else None
        for path in sorted((directory / "thresholded_matrices").glob("thresholded_matrix_*.npz")):
            sparse = path.with_name("sparse_" + path.name)
            report["thresholded"][path.stem] = {
                "dense": app.load_thresholded_matrix(str(path)).tolist(),
                "sparse": app.load_sparse_thresholded_matrix(str(sparse)).toarray().tolist(),
            }
        for path in sorted((directory / "dataframes").glob("node_info_df_*.csv")):
            df = pd.read_csv(path)
            report["node_tables"][path.name] = {
                "columns": list(df.columns),
                "top_10_tokens": [ast.literal_eval(x) for x in df["top_10_tokens"]],
                "records": df.drop(columns=["top_10_tokens"]).astype(str).to_dict("list"),
            }
        for path in sorted((directory / "pca").glob("*.h5")):
            by_id = {}
            for sid in app.load_available_subgraphs(str(path)):
                top, context = app.load_subgraph_metadata(str(path), sid)
                _, df = app.load_subgraph_data(str(path), sid, LOAD_OPTIONS)
                by_id[str(sid)] = {
                    "top_3_tokens": [x if isinstance(x, str) else repr(x) for x in top],
                    "example_context": context if isinstance(context, str) else repr(context),
                    "tokens": [x if isinstance(x, str) else repr(x) for x in df["tokens"]],
                    "context": [x if isinstance(x, str) else repr(x) for x in df["context"]],
                    "types": sorted({type(x).__name__ for x in [*top, *df["tokens"], *df["context"]]}),
                }
            report["pca"][path.name] = by_id
    out.write_text(json.dumps(report, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="a checkout of MClarke1991/sae_cooccurrence")
    parser.add_argument("--check-readers", type=Path, help="a hook's results folder that mechscope wrote")
    parser.add_argument("--out", type=Path, help="where --check-readers writes its JSON")
    parser.add_argument("--commit", help="the checkout's commit, when it is not a git work tree")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    if args.check_readers is not None:
        if args.out is None:
            parser.error("--check-readers needs --out")
        check_readers(args.check_readers, args.out)
    else:
        generate(args.src, args.commit)


if __name__ == "__main__":
    main()
