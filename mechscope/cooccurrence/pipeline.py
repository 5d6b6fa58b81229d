"""The co-occurrence pipeline: ``run_count``, ``run_graphs``, ``run_pca`` and ``run_all`` over a :class:`CoocConfig`.

Stages and what they leave in ``results_dir`` (one folder per ``sae_id``, a hook name)::

    count_checkpoint.npz          partial counts of every (sae_id, threshold), batches done, tokens, settings
    <sae_id>/feature_acts_cooc_*  counts, Jaccard and activations per threshold, and the tokens counted (count)
    <sae_id>/graph_summary_*      subgraphs, node tables, HTML graphs and their summary per threshold (graphs)
    <sae_id>/...                  PCA results of candidate subgraphs per threshold (pca)
    summary.json                  {sae_id: {threshold: graph summary}}

Counting reads the model's activations at every ``sae_id`` hook in one pass per batch of contexts (streamed live,
or from ``activations_dir`` shards), cut into batches of ``batch_size_tokens`` rows. After every
``checkpoint_every`` batches the exact int64 counts, the batches done, the tokens counted and where the next batch
starts are written atomically to ``count_checkpoint.npz``; a rerun with the same settings continues from there
(recounting nothing and losing nothing), and a finished count is skipped. Raising ``n_batches`` later extends it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.apps.tables import format_table
from mechscope.cooccurrence.config import CoocConfig
from mechscope.cooccurrence.counting import CooccurrenceCounts, count_cooccurrences, jaccard
from mechscope.cooccurrence.graph import Subgraph, edge_threshold, graph_results, subgraphs
from mechscope.cooccurrence.outputs import (
    CHECKPOINT,
    TOKENS_FILE,
    Counts,
    file_name,
    graph_summary_path,
    load_checkpoint,
    load_counts,
    load_graph_summary,
    load_matrix,
    read_checkpoint_state,
    save_checkpoint,
    save_counts,
    save_graphs,
    save_pca_results,
    save_summaries,
)
from mechscope.cooccurrence.pca_results import subgraph_pca_results
from mechscope.cooccurrence.subspace import pca_candidates
from mechscope.data.store import ActivationStore, Rows
from mechscope.files import check_settings
from mechscope.models.hooked import HookedModel
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.tokens import latent_tokens

SAEs = SparseAutoencoder | dict[str, SparseAutoencoder] | None
_DESCRIPTIVE_SAE_FIELDS = {"model_name", "hook_name", "neuronpedia_id", "device"}  # no effect on the latents


# ---- loading -------------------------------------------------------------------------------------------------


def load_model(config: CoocConfig, model: HookedModel | None = None) -> HookedModel:
    """``model``, or ``config.generation.model_name`` loaded on ``config.generation.device``."""
    gen = config.generation
    return model if model is not None else HookedModel.from_pretrained(gen.model_name, device=gen.device)


def load_saes(config: CoocConfig, model: HookedModel, sae: SAEs = None) -> dict[str, SparseAutoencoder]:
    """``{sae_id: SAE}`` from ``sae`` (one SAE or a dict by sae_id) or from ``[generation].sae`` paths.

    ``sae_ids`` default to the dict's keys, or to the one SAE's ``cfg.hook_name``. Each SAE's ``d_in`` must be the
    width of its hook in ``model``.
    """
    gen = config.generation
    if sae is None:
        if gen.sae is None:
            raise ValueError("no SAE: set [generation].sae to an SAE path (or a table sae_id -> path)")
        paths = gen.sae if isinstance(gen.sae, dict) else {None: gen.sae}
        sae = {k: SparseAutoencoder.load(p, device=gen.device) for k, p in paths.items()}
        if None in sae:
            sae = sae[None]
    if isinstance(sae, SparseAutoencoder):
        ids = gen.sae_ids or [sae.cfg.hook_name]
        if ids == [None]:
            raise ValueError("the SAE's config names no hook: set [generation].sae_ids to the hook it reads")
        if len(ids) > 1:
            raise ValueError(f"one SAE for {len(ids)} sae_ids {ids}: give one SAE per sae_id (a table)")
        saes = {ids[0]: sae}
    else:
        ids = gen.sae_ids or list(sae)
        missing = [i for i in ids if i not in sae]
        if missing:
            raise ValueError(f"sae_ids {missing} have no SAE (given: {list(sae)})")
        saes = {i: sae[i] for i in ids}
    for sae_id, s in saes.items():
        width = model.hook_width(sae_id)  # an unknown hook name fails here, with the closest valid names
        if s.cfg.d_in != width:
            raise ValueError(
                f"the SAE for {sae_id!r} has d_in={s.cfg.d_in} but that hook of {gen.model_name!r} is {width} wide: "
                "use the SAE trained on this hook, or the sae_id (hook name) it was trained on"
            )
    return saes


def _store(config: CoocConfig, model: HookedModel, sae_ids: list[str], n_rows: int) -> ActivationStore:
    """The activations at ``sae_ids``: live, or from ``activations_dir``, whose harvest is first extended to
    ``n_rows`` rows (resuming one that is there)."""
    gen = config.generation
    store = ActivationStore(
        model,
        sae_ids,
        gen.corpus,
        context_length=gen.context_length,
        batch_contexts=gen.batch_contexts,
        exclude_special=gen.remove_special_tokens,
        text_field=gen.text_field,
        activations_dir=gen.activations_dir,
    )
    if store.activations_dir is not None:
        store.harvest(n_rows)
    return store


def encode(sae: SparseAutoencoder, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """Latents of ``x [batch, d_in]``: ``(indices, values)``, each ``[batch, k]``, for topk SAEs, else dense
    ``[batch, d_sae]``."""
    with torch.no_grad():
        x = x.to(sae.W_enc.device)
        if sae.cfg.architecture == "topk":
            return tuple(sae.encode_sparse(x))
        return sae.encode(x)


def _sae_threshold(sae: SparseAutoencoder) -> Tensor | None:
    """The JumpReLU threshold ``[d_sae]`` counting adds to each activity threshold, or None."""
    return sae.threshold.detach() if sae.cfg.architecture == "jumprelu" else None


# ---- count -----------------------------------------------------------------------------------------------------


def count_settings(config: CoocConfig, saes: dict[str, SparseAutoencoder]) -> dict[str, Any]:
    """What determines the counted rows and counts; a checkpoint is resumed only under identical settings."""
    gen = config.generation
    return {
        "model_name": gen.model_name,
        "corpus": gen.corpus or "default",
        "text_field": gen.text_field,
        "context_length": gen.context_length,
        "batch_contexts": gen.batch_contexts,
        "remove_special_tokens": gen.remove_special_tokens,
        "batch_size_tokens": gen.batch_size_tokens,
        "activation_thresholds": gen.activation_thresholds,
        "activations": gen.activations_dir or "live",
        "sae_sha256": {sae_id: _fingerprint(sae) for sae_id, sae in saes.items()},
    }


def _fingerprint(sae: SparseAutoencoder) -> str:
    """SHA-256 of what the SAE's encoding depends on: its config (less the descriptive fields) and its parameters
    (their bytes, in name order)."""
    encoding = {k: v for k, v in dataclasses.asdict(sae.cfg).items() if k not in _DESCRIPTIVE_SAE_FIELDS}
    digest = hashlib.sha256(json.dumps(encoding, sort_keys=True).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_count(
    config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None, *, stop_after: int | None = None
) -> Counts:
    """Count co-occurrences of every sae_id's latents over ``n_batches`` batches; resume a checkpoint if present.

    Returns ``{sae_id: {threshold: CooccurrenceCounts}}`` and writes them with ``save_counts`` to
    ``results_dir/<sae_id>``. ``stop_after`` stops (with a checkpoint) once that many batches are done in all, as
    an interruption would.
    """
    gen = config.generation
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    results = Path(config.results_dir)
    settings = count_settings(config, saes)
    thresholds = gen.activation_thresholds
    state = {
        "settings": settings,
        "sae_ids": list(saes),
        "thresholds": thresholds,
        "batches_done": 0,
        "n_tokens": 0,
        "next": [0, 0],
        "exhausted": False,
        "saved_n_batches": None,
    }
    counts: Counts = {}
    checkpoint = results / CHECKPOINT
    if checkpoint.exists():
        state, counts = _resume(checkpoint, state, {i: s.cfg.d_sae for i, s in saes.items()}, gen.n_batches)
    target = gen.n_batches if stop_after is None else min(stop_after, gen.n_batches)
    if state["saved_n_batches"] == gen.n_batches and all((results / i / TOKENS_FILE).exists() for i in counts):
        print(f"count: already done ({state['batches_done']} batches, {state['n_tokens']} tokens) in {results}")
        return counts
    store = _store(config, model, list(saes), gen.n_batches * gen.batch_size_tokens)
    key, skip = state["next"]
    batches = store.resumable_batches(gen.batch_size_tokens, (key, skip))
    bar = tqdm(total=gen.n_batches, initial=state["batches_done"], unit="batch", desc="count")
    try:
        while state["batches_done"] < target and not state["exhausted"]:
            item = next(batches, None)
            if item is None:
                state["exhausted"] = True
                break
            rows, state["next"] = item
            _count_batch(rows, saes, thresholds, counts)
            state["batches_done"] += 1
            state["n_tokens"] += len(rows["tokens"])
            for by_t in counts.values():
                for c in by_t.values():
                    c.n_tokens = state["n_tokens"]
            bar.update(1)
            if state["batches_done"] % gen.checkpoint_every == 0:
                save_checkpoint(checkpoint, state, counts)
    finally:
        bar.close()
    if not counts:
        raise ValueError(f"the corpus {gen.corpus or 'default'!r} gave no tokens to count: use a larger corpus")
    if state["batches_done"] < gen.n_batches and not state["exhausted"]:
        save_checkpoint(checkpoint, state, counts)
        return counts  # stopped early (stop_after): the next run resumes
    if state["exhausted"] and state["batches_done"] < gen.n_batches:
        warnings.warn(
            f"the corpus ran out after {state['batches_done']} of {gen.n_batches} batches ({state['n_tokens']} "
            "tokens): lower n_batches, or use a larger corpus",
            stacklevel=2,
        )
    for sae_id, by_t in counts.items():
        save_counts(results / sae_id, by_t)
    state["saved_n_batches"] = gen.n_batches
    save_checkpoint(checkpoint, state, counts)
    print(f"count: {state['n_tokens']} tokens in {state['batches_done']} batches; counts in {results}/<sae_id>/")
    return counts


def _resume(path: Path, fresh: dict[str, Any], d_sae: dict[str, int], n_batches: int) -> tuple[dict, Counts]:
    """The checkpoint's state and counts, after checking it was written under ``fresh``'s settings."""
    stored = read_checkpoint_state(path)
    check_settings(
        stored["settings"],
        fresh["settings"],
        where=path,
        what="was counted",
        fix="restore those settings to resume, or use another results_dir (or delete the checkpoint) to count "
        "from scratch",
        labels="checkpoint, now",
    )
    if stored["batches_done"] > n_batches:
        raise ValueError(
            f"{path} already holds {stored['batches_done']} batches, more than n_batches={n_batches}: raise "
            "n_batches, or use another results_dir to count fewer"
        )
    state, counts = load_checkpoint(path, d_sae)
    if state["saved_n_batches"] != n_batches:
        state["saved_n_batches"] = None
    return state, counts


def _count_batch(rows: Rows, saes: dict[str, SparseAutoencoder], thresholds: list[float], counts: Counts) -> None:
    """Add one batch's co-occurrences to ``counts`` (in place) for every sae_id and threshold."""
    for sae_id, sae in saes.items():
        batch = count_cooccurrences(
            [encode(sae, rows[sae_id])],
            thresholds,
            sae_threshold=_sae_threshold(sae),
            d_sae=sae.cfg.d_sae,
            progress=False,
        )
        if sae_id not in counts:
            counts[sae_id] = batch
            continue
        for t, c in batch.items():
            counts[sae_id][t].counts = (counts[sae_id][t].counts + c.counts).tocsr()


def _counts_for(config: CoocConfig, sae_id: str, counts: Counts | None) -> dict[float, CooccurrenceCounts]:
    if counts is not None and sae_id in counts:
        return counts[sae_id]
    directory = Path(config.results_dir) / sae_id
    try:
        return {t: load_counts(directory, t) for t in config.generation.activation_thresholds}
    except (FileNotFoundError, KeyError) as e:
        raise FileNotFoundError(f"no counts for {sae_id!r} in {directory} ({e}): run the count stage first") from None


# ---- graphs ----------------------------------------------------------------------------------------------------


def run_graphs(
    config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None, *, counts: Counts | None = None
) -> dict[str, dict[float, dict]]:
    """Per sae_id and threshold: Jaccard, edge threshold, subgraphs, and ``save_graphs`` (node tables, HTML graphs,
    summary). ``counts`` default to what the count stage wrote. Prints a summary table and the HTML paths, writes
    ``results_dir/summary.json``, and returns ``{sae_id: {threshold: summary}}``."""
    an = config.analysis
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    out: dict[str, dict[float, dict]] = {}
    jobs = [(sae_id, t) for sae_id in saes for t in config.generation.activation_thresholds]
    tokens = {}
    for sae_id, t in tqdm(jobs, desc="graphs", unit="threshold"):
        s = saes[sae_id]
        if sae_id not in tokens:
            tokens[sae_id] = latent_tokens(s.W_dec, model.W_E, model.W_U, model.tokenizer, k=10)
        c = _counts_for(config, sae_id, counts)[t]
        j = jaccard(c)
        edge = edge_threshold(j, an.min_subgraph_size, an.max_subgraph_size)
        graphs = graph_results(
            subgraphs(j, edge.threshold),
            t,
            edge,
            c.activations,
            c.n_tokens,
            include_metrics=an.include_metrics,
            tokens=tokens[sae_id],
            neuronpedia_id=s.cfg.neuronpedia_id,
        )
        out.setdefault(sae_id, {})[t] = save_graphs(
            Path(config.results_dir) / sae_id,
            graphs,
            min_subgraph_size_to_plot=an.min_subgraph_size_to_plot,
            skip_subgraph_plots=an.skip_subgraph_plots,
            skip_subgraph_files=an.skip_subgraph_files,
        )
    save_summaries(config.results_dir, out)
    print(format_summary(out))
    return out


def format_summary(summaries: dict[str, dict[float, dict]]) -> str:
    """The graph summaries as a table (one row per sae_id and threshold), followed by the HTML index and histogram
    paths each summary names."""
    headers = ["sae_id", "threshold", "edge", "in subgraphs", "largest", "subgraphs", "mean size", "active/token"]
    rows, paths = [], []
    for sae_id, by_t in summaries.items():
        for t, s in by_t.items():
            rows.append(
                [
                    sae_id,
                    f"{t:g}",
                    f"{s['edge_threshold']:.4f}",
                    f"{s['share_in_subgraphs']:.1%}",
                    str(s["largest_subgraph"]),
                    str(s["n_subgraphs"]),
                    f"{s['mean_subgraph_size']:.2f}",
                    f"{s['mean_active_per_token']:.2f}",
                ]
            )
            paths += [f"  {sae_id} @ {t:g} {key}: {s[key]}" for key in ("html_index", "histogram") if s.get(key)]
    return "\n".join(["Co-occurrence graphs", format_table(headers, rows, right=list(range(1, 8))), *paths])


def load_subgraphs(config: CoocConfig, sae_id: str, threshold: float) -> list[Subgraph]:
    """The subgraphs the graphs stage found: the saved Jaccard matrix cut at its summary's edge threshold."""
    directory = Path(config.results_dir) / sae_id
    graphs = load_graph_summary(directory, threshold)
    counted = _counts_for(config, sae_id, None)[float(threshold)].n_tokens
    if graphs.get("n_tokens") != counted:
        raise ValueError(
            f"{graph_summary_path(directory, threshold)} was built from {graphs.get('n_tokens')} counted tokens, "
            f"but the counts now hold {counted}: run the graphs stage again"
        )
    return subgraphs(load_matrix(directory / file_name("jaccard", threshold)), graphs["edge_threshold"])


# ---- pca ---------------------------------------------------------------------------------------------------------


def run_pca(config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None) -> dict[str, dict[float, list]]:
    """Per sae_id and threshold: choose candidate subgraphs by size, collect ``n_batches_reconstruction`` batches of
    latents with their tokens, contexts and positions, and ``save_pca_results``. Returns the paths written,
    ``{sae_id: {threshold: [Path]}}``."""
    gen, pca = config.generation, config.pca
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    store = _store(config, model, list(saes), pca.n_batches_reconstruction * gen.batch_size_tokens)
    batches = store.resumable_batches(gen.batch_size_tokens)
    collected = [rows for rows, _ in islice(batches, pca.n_batches_reconstruction)]
    if not collected:
        raise ValueError(f"the corpus {gen.corpus or 'default'!r} gave no tokens for the PCA: use a larger corpus")
    meta = {key: torch.cat([rows[key] for rows in collected]) for key in ("tokens", "context", "position")}
    out: dict[str, dict[float, list]] = {}
    for sae_id, s in saes.items():
        latents = [encode(s, rows[sae_id]) for rows in collected]
        for t in tqdm(gen.activation_thresholds, desc=f"pca {sae_id}", unit="threshold"):
            subs = load_subgraphs(config, sae_id, t)
            candidates = pca_candidates(subs, pca.candidate_sizes, pca.candidates_per_size, config.analysis.random_seed)
            empty = [size for size in pca.candidate_sizes if not candidates.get(size)]
            if empty:
                warnings.warn(f"{sae_id} @ {t:g}: no subgraph of size {empty} for the PCA", stacklevel=2)
            results = subgraph_pca_results(
                candidates,
                latents,
                meta["tokens"],
                meta["context"],
                meta["position"],
                s.W_dec,
                model.tokenizer,
                t,
                max_examples=pca.max_examples,
            )
            out.setdefault(sae_id, {})[t] = save_pca_results(Path(config.results_dir) / sae_id, results)
    return out


# ---- all -----------------------------------------------------------------------------------------------------------


def run_all(config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None) -> dict[str, Any]:
    """Count (resuming), graphs and PCA, loading the model and SAEs once; prints where the results are.

    Returns ``{"counts": ..., "graphs": ..., "pca": ...}`` as the stages return them.
    """
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    counts = run_count(config, model, saes)
    graphs = run_graphs(config, model, saes, counts=counts)
    pca = run_pca(config, model, saes)
    print(f"Results in {Path(config.results_dir).resolve()}")
    return {"counts": counts, "graphs": graphs, "pca": pca}
