"""The co-occurrence pipeline: ``run_count``, ``run_graphs``, ``run_pca`` and ``run_all`` over a :class:`CoocConfig`.

It only orchestrates: the model and SAEs come from their public loaders, the rows from an
:class:`~mechscope.data.ActivationStore`, the values from the compute modules (``counting``, ``graph``,
``subspace``, ``pca_results``), and every file goes through :mod:`mechscope.cooccurrence.outputs`. The stages
return what they computed (the graph summaries included; the command line prints them as a table).

Stages and what they leave in ``results_dir`` (one folder per hook name; the layout is in ``outputs``)::

    count_checkpoint.npz          partial counts of every (hook, threshold), batches done, tokens, settings
    <hook>/mechscope_cooc_*       counts, Jaccard and activations per threshold, and the tokens counted (count;
                                  feature_acts_cooc_* with output_format = "sae_cooccurrence")
    <hook>/graph_summary_*        subgraphs, node tables, partners and their summary per threshold (graphs)
    <hook>/...                    PCA results of candidate subgraphs per threshold (pca)
    summary.json                  {hook: {threshold: graph summary}}

Counting reads the model's activations at every hook in one pass per batch of contexts (streamed live, or from
``activations_dir`` shards), cut into batches of ``batch_size_tokens`` rows. After every ``checkpoint_every``
batches or ``checkpoint_seconds`` seconds, whichever comes first, and on SIGINT / SIGTERM, the exact int64 counts,
the batches done, the tokens counted and where the next batch starts are written atomically to
``count_checkpoint.npz``; a rerun with the same settings continues from there (recounting nothing and losing
nothing), and a finished count is skipped. Raising ``n_batches`` later extends it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm.auto import tqdm

import mechscope.distributed as distributed
from mechscope.cooccurrence.config import CoocConfig
from mechscope.cooccurrence.counting import (
    CooccurrenceCounter,
    CooccurrenceCounts,
    decoder_norms,
    fold_decoder_norms,
    jaccard,
    sum_counts,
)
from mechscope.cooccurrence.graph import Subgraph, edge_threshold, graph_results, subgraphs, top_cooccurring
from mechscope.cooccurrence.layout import CHECKPOINT, graph_summary_path, load_graph_summary
from mechscope.cooccurrence.outputs import (
    Counts,
    count_files_problem,
    load_checkpoint,
    load_counts,
    load_jaccard,
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
from mechscope.files import check_settings, clean_directory
from mechscope.interrupts import Cadence, stop_on_signals
from mechscope.models.hooked import HookedModel
from mechscope.sae import SparseAutoencoder, SparseLatents, load_sae
from mechscope.sae.splice import check_trained_hook
from mechscope.sae.tokens import latent_tokens

SAEs = SparseAutoencoder | dict[str, SparseAutoencoder] | None
# ---- loading -------------------------------------------------------------------------------------------------


def load_model(config: CoocConfig, model: HookedModel | None = None) -> HookedModel:
    """``model``, or ``config.counting.model`` loaded on ``config.counting.device``."""
    counting = config.counting
    return model if model is not None else HookedModel.from_pretrained(counting.model, device=counting.device)


def load_saes(config: CoocConfig, model: HookedModel, sae: SAEs = None) -> dict[str, SparseAutoencoder]:
    """``{hook name: SAE}`` from ``sae`` (one SAE or a dict by hook name) or from ``[counting].sae`` paths
    (:func:`~mechscope.sae.load_sae`).

    ``hook_names`` default to the dict's keys, or to the one SAE's ``cfg.hook_name``. Each SAE's ``d_in`` must be the
    width of its hook in ``model``.
    """
    counting = config.counting
    if sae is None:
        if counting.sae is None:
            raise ValueError("no SAE: set [counting].sae to an SAE path (or a table hook name -> path)")
        if isinstance(counting.sae, dict):
            sae = {hook: load_sae(path, device=counting.device) for hook, path in counting.sae.items()}
        else:
            sae = load_sae(counting.sae, device=counting.device)
    if isinstance(sae, SparseAutoencoder):
        own = [sae.cfg.hook_name] if sae.cfg.hook_name is not None else None
        ids = counting.hook_names or own
        if ids is None:
            raise ValueError("the SAE's config names no hook: set [counting].hook_names to the hook it reads")
        if len(ids) > 1:
            raise ValueError(f"one SAE for {len(ids)} hook_names {ids}: give one SAE per hook name (a table)")
        saes = {ids[0]: sae}
    else:
        ids = counting.hook_names or list(sae)
        missing = [i for i in ids if i not in sae]
        if missing:
            raise ValueError(f"hook_names {missing} have no SAE (given: {list(sae)})")
        saes = {i: sae[i] for i in ids}
    for hook, s in saes.items():
        width = model.hook_width(hook)  # an unknown hook name fails here, with the closest valid names
        check_trained_hook(s, hook, counting.allow_hook_mismatch)
        if s.cfg.d_in != width:
            raise ValueError(
                f"the SAE for {hook!r} has d_in={s.cfg.d_in} but that hook of {counting.model!r} is {width} wide: "
                "use the SAE trained on this hook, or the hook name it was trained on"
            )
    return saes


def _store(
    config: CoocConfig, model: HookedModel, hook_names: list[str], n_rows: int, data_parallel: bool
) -> ActivationStore:
    """The activations at ``hook_names``: live, or from ``activations_dir``, whose harvest is first extended to
    ``n_rows`` rows (resuming one that is there). With ``data_parallel`` every rank under torchrun calls it and
    harvests its share of the shards (:meth:`~mechscope.data.store.ActivationStore.harvest`); without, this process
    harvests alone (a stage that runs on rank 0 only)."""
    counting = config.counting
    store = ActivationStore(
        model,
        hook_names,
        counting.corpus,
        context_length=counting.context_length,
        batch_contexts=counting.batch_contexts,
        exclude_special=counting.remove_special_tokens,
        text_field=counting.text_field,
        activations_dir=counting.activations_dir,
    )
    if store.activations_dir is not None:
        store.harvest(n_rows, data_parallel=data_parallel)
    return store


def encode(sae: SparseAutoencoder, x: Tensor, fold: bool = False) -> SparseLatents:
    """The active latents of ``x [batch, d_in]``: ``SparseLatents`` of ``[batch, k]`` each; with ``fold``, as the
    SAE gives them with its decoder norms folded into its encoder (:func:`~mechscope.cooccurrence.counting.
    fold_decoder_norms`)."""
    with torch.no_grad():
        latents = sae.encode_sparse(x.to(sae.W_enc.device))
        return fold_decoder_norms(latents, decoder_norms(sae.W_dec)) if fold else latents


def _sae_threshold(sae: SparseAutoencoder, fold: bool = False) -> Tensor | None:
    """The JumpReLU threshold ``[d_sae]`` counting adds to each activity threshold (times the decoder norms with
    ``fold``, as folding scales it), or None."""
    if sae.cfg.architecture != "jumprelu":
        return None
    threshold = sae.threshold.detach().float()
    return threshold * decoder_norms(sae.W_dec).to(threshold.device) if fold else threshold


def _decoder(sae: SparseAutoencoder, fold: bool = False) -> Tensor:
    """``W_dec [d_sae, d_in]``, with unit-norm rows when the decoder norms are folded into the latents."""
    w = sae.W_dec.detach()
    return w / decoder_norms(w).to(w.device, w.dtype)[:, None] if fold else w


# ---- count -----------------------------------------------------------------------------------------------------


def count_settings(config: CoocConfig, saes: dict[str, SparseAutoencoder], model: HookedModel) -> dict[str, Any]:
    """What determines the counted rows and counts; a checkpoint is resumed only under identical settings (named as
    checkpoints have always named them, so older ones still resume; ``fold_decoder_norms`` appears only when it
    is on, so a checkpoint from before it existed, which did not fold, resumes with it off); the model is named and
    fingerprinted (:meth:`~mechscope.models.HookedModel.fingerprint`): another model of the same name is noticed."""
    counting = config.counting
    fold = {"fold_decoder_norms": True} if counting.fold_decoder_norms else {}
    return {
        "model_name": counting.model,
        "model_fingerprint": model.fingerprint(),
        "corpus": counting.corpus or "default",
        "text_field": counting.text_field,
        "context_length": counting.context_length,
        "batch_contexts": counting.batch_contexts,
        "remove_special_tokens": counting.remove_special_tokens,
        "batch_size_tokens": counting.batch_size_tokens,
        "activation_thresholds": counting.activation_thresholds,
        "activations": counting.activations_dir or "live",
        "sae_sha256": {hook: sae.fingerprint() for hook, sae in saes.items()},
        **fold,
    }


def run_count(
    config: CoocConfig,
    model: HookedModel | None = None,
    sae: SAEs = None,
    *,
    stop_after: int | None = None,
    on_batch: Callable[[int, Rows], object] | None = None,
) -> Counts:
    """Count co-occurrences of every hook's latents over ``n_batches`` batches; resume a checkpoint if present.

    Returns ``{hook: {threshold: CooccurrenceCounts}}`` and writes them with ``save_counts`` to
    ``results_dir/<hook>``. Under torchrun (:mod:`mechscope.distributed`) batch ``i`` is counted by rank
    ``i % world_size``, every checkpoint sums the ranks' sparse counts on rank 0, which writes it (the same file one
    process writes, so a count resumes under any number of ranks), and rank 0 returns and writes the counts (the
    other ranks return ``{}``); the harvest into ``activations_dir`` is shared, each rank writing its share of the
    shards. ``stop_after`` stops (with a checkpoint) once that many batches are done in all, as
    an interruption would. ``on_batch(batches_done, rows)`` is called after each batch is counted, before it is
    checkpointed; an exception it raises ends the run as a kill would (batches since the last checkpoint are lost
    and counted again by the next run), so a test can check that a resumed count equals an uninterrupted one.
    """
    counting = config.counting
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    results = Path(config.results_dir)
    settings = count_settings(config, saes, model)
    thresholds = counting.activation_thresholds
    state: dict[str, Any] = {
        "settings": settings,
        "sae_ids": list(saes),  # the hook names (the checkpoint's name for them)
        "thresholds": thresholds,
        "batches_done": 0,
        "n_tokens": 0,
        "next": [0, 0],
        "exhausted": False,
        "saved_n_batches": None,
    }
    counts: Counts = {}
    checkpoint = results / CHECKPOINT
    for folder in (results, *(results / hook for hook in saes)):
        clean_directory(folder)  # what killed runs left
    d_sae = {i: s.cfg.d_sae for i, s in saes.items()}
    if checkpoint.exists():
        state, counts = _resume(checkpoint, state, d_sae, counting.n_batches)
        if not distributed.is_main():
            counts = {}  # rank 0 holds the checkpoint's counts; the others add only the batches they count
    target = counting.n_batches if stop_after is None else min(stop_after, counting.n_batches)
    if distributed.broadcast(state["saved_n_batches"] == counting.n_batches):  # rank 0 holds the counts
        problems = [
            p
            for i in counts
            if (p := count_files_problem(results / i, thresholds, config.output_format, d_sae[i], state["n_tokens"]))
        ]
        if not problems:
            done = f"{state['batches_done']} batches, {state['n_tokens']} tokens"
            distributed.print_main(f"count: already done ({done}) in {results}")
            return counts
        print(f"count: done, but {problems[0]}: writing the counts again from {checkpoint}")
        for hook, by_t in counts.items():
            save_counts(results / hook, by_t, config.output_format)
        return counts
    store = _store(config, model, list(saes), counting.n_batches * counting.batch_size_tokens, data_parallel=True)
    key, skip = state["next"]
    batches = store.resumable_batches(counting.batch_size_tokens, (key, skip))
    bar = tqdm(
        total=counting.n_batches, initial=state["batches_done"], unit="batch", desc="count", disable=distributed.quiet()
    )
    due = Cadence(counting.checkpoint_every, counting.checkpoint_seconds)
    fold = counting.fold_decoder_norms
    running = _counters(saes, thresholds, fold, counts)
    with stop_on_signals() as stop, closing(bar):
        while state["batches_done"] < target and not state["exhausted"]:
            item = next(batches, None)
            if item is None:
                state["exhausted"] = True
                break
            rows, state["next"] = item
            if distributed.owns(state["batches_done"]):  # batch i is counted by rank i % world_size
                for hook, sae in saes.items():
                    running[hook].add(encode(sae, rows[hook], fold))
            state["batches_done"] += 1
            state["n_tokens"] += len(rows["tokens"])
            bar.update(1)
            if on_batch is not None:
                on_batch(state["batches_done"], rows)
            # every rank stops, and checkpoints (a collective), at the same batch, although their clocks differ
            signum, checkpoint_due = distributed.combine_all((stop.signum or 0, due()), _either)
            if checkpoint_due or signum:
                counts = _save_checkpoint(checkpoint, state, _totals(running, state["n_tokens"]), d_sae)
                running = _counters(saes, thresholds, fold, counts)
            if signum and state["batches_done"] < counting.n_batches:  # also on a rank the signal did not reach
                where = f"batch {state['batches_done']} of {counting.n_batches}"
                raise stop.interrupted("cooc count", checkpoint, where, signum)
    counts = _sum_ranks(_totals(running, state["n_tokens"]), state["n_tokens"], d_sae, thresholds)
    if not distributed.is_main():
        return {}  # rank 0 returns and writes the counts
    if not counts:
        raise ValueError(f"the corpus {counting.corpus or 'default'!r} gave no tokens to count: use a larger corpus")
    if state["batches_done"] < counting.n_batches and not state["exhausted"]:
        save_checkpoint(checkpoint, state, counts)
        return counts  # stopped early (stop_after): the next run resumes
    if state["exhausted"] and state["batches_done"] < counting.n_batches:
        warnings.warn(
            f"the corpus ran out after {state['batches_done']} of {counting.n_batches} batches ({state['n_tokens']} "
            "tokens): lower n_batches, or use a larger corpus",
            stacklevel=2,
        )
    for hook, by_t in counts.items():
        save_counts(results / hook, by_t, config.output_format)
    state["saved_n_batches"] = counting.n_batches
    save_checkpoint(checkpoint, state, counts)
    done = f"{state['n_tokens']} tokens in {state['batches_done']} batches"
    distributed.print_main(f"count: {done}; counts in {results}/<hook>/")
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


def _counters(
    saes: dict[str, SparseAutoencoder], thresholds: list[float], fold: bool, counts: Counts
) -> dict[str, CooccurrenceCounter]:
    """A counter per hook that continues from ``counts`` (a checkpoint's, or rank 0's sum; ``{}``: from nothing);
    ``fold``: the SAE's JumpReLU threshold scaled as folding its decoder norms scales it."""
    return {
        hook: CooccurrenceCounter(thresholds, sae.cfg.d_sae, _sae_threshold(sae, fold), start=counts.get(hook))
        for hook, sae in saes.items()
    }


def _totals(counters: dict[str, CooccurrenceCounter], n_tokens: int) -> Counts:
    """The counts of the hooks the counters counted or continued (the others stay out), over ``n_tokens`` tokens
    (every rank's, where the counter knows only its own)."""
    return {
        hook: {t: CooccurrenceCounts(t, c.counts, n_tokens) for t, c in counter.counts().items()}
        for hook, counter in counters.items()
        if counter.n_tokens
    }


def _either(a: tuple[int, bool], b: tuple[int, bool]) -> tuple[int, bool]:
    """Two ranks' ``(stop signal or 0, checkpoint due)`` combined: either's signal, due when due on either."""
    return a[0] or b[0], a[1] or b[1]


def _csr_tensors(matrix: sp.csr_array) -> list[Tensor]:
    """``matrix``'s CSR arrays as the tensors :func:`_sum_ranks` sends: ``[indptr (int64), indices (int32), data
    (int64)]``, sharing their memory where the dtype is already that one."""
    arrays = [(matrix.indptr, np.int64), (matrix.indices, np.int32), (matrix.data, np.int64)]
    return [torch.from_numpy(np.ascontiguousarray(a, dtype)) for a, dtype in arrays]


def _csr(tensors: list[Tensor], n: int) -> sp.csr_array:
    """The ``[n, n]`` matrix of :func:`_csr_tensors`' arrays, on their memory (an int32 indptr, so that scipy keeps
    the int32 indices rather than copying them to int64, unless its last value needs int64)."""
    indptr, indices, data = (t.numpy() for t in tensors)
    if indptr[-1] < 2**31:
        indptr = indptr.astype(np.int32)
    return sp.csr_array((data, indices, indptr), shape=(n, n))


def _sum_ranks(counts: Counts, n_tokens: int, d_sae: dict[str, int], thresholds: list[float]) -> Counts:
    """On rank 0, the counts of every rank summed (the others' are the batches they counted since the last sum);
    ``{}`` on the other ranks, which start again from nothing. One process: ``counts`` as they are.

    The sparse matrices are sent to rank 0 and summed there, not all-reduced: a dense ``[d_sae, d_sae]`` int64
    all-reduce would need 137 GB per matrix at 131k latents, the sparse counts a small part of it. One (hook,
    threshold) at a time, every rank sends its matrix's CSR arrays in place (:func:`~mechscope.distributed.
    gather_tensors_to_main`: no pickled copy, no padding) and rank 0 adds the ranks' matrices in one pass
    (:func:`~mechscope.cooccurrence.counting.sum_counts`): it holds, besides the sums so far, one matrix per rank
    and their sum. The hooks no rank has counted yet stay out, as in one process."""
    if distributed.world_size() == 1:
        return counts
    present = distributed.combine_all(sorted(counts), lambda a, b: sorted({*a, *b}))
    summed: Counts = {}
    for hook in (h for h in d_sae if h in present):
        n = d_sae[hook]
        for t in map(float, thresholds):
            own = counts[hook][t].counts if hook in counts else sp.csr_array((n, n), dtype=np.int64)
            gathered = distributed.gather_tensors_to_main(_csr_tensors(own))
            if gathered is not None:
                total = sum_counts([_csr(tensors, n) for tensors in gathered])
                summed.setdefault(hook, {})[t] = CooccurrenceCounts(t, total, n_tokens)
    return summed


def _save_checkpoint(path: Path, state: dict[str, Any], counts: Counts, d_sae: dict[str, int]) -> Counts:
    """Sum the ranks' counts on rank 0 and write the checkpoint there (the same file one process writes); returns
    this rank's counts after the sum (the total on rank 0, nothing on the others)."""
    counts = _sum_ranks(counts, state["n_tokens"], d_sae, state["thresholds"])
    if distributed.is_main():
        save_checkpoint(path, state, counts)
    return counts


def _counts_for(config: CoocConfig, hook: str, counts: Counts | None) -> dict[float, CooccurrenceCounts]:
    if counts is not None and hook in counts:
        return counts[hook]
    directory = Path(config.results_dir) / hook
    try:
        return {t: load_counts(directory, t) for t in config.counting.activation_thresholds}
    except (FileNotFoundError, KeyError) as e:
        raise FileNotFoundError(f"no counts for {hook!r} in {directory} ({e}): run the count stage first") from None


# ---- graphs ----------------------------------------------------------------------------------------------------


def run_graphs(
    config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None, *, counts: Counts | None = None
) -> dict[str, dict[float, dict]]:
    """Per hook and threshold: Jaccard, edge threshold, subgraphs, their node table and summary
    (``graph_results``) and each latent's most co-occurring latents, written by ``save_graphs``. ``counts``
    default to what the count stage wrote. Writes ``results_dir/summary.json`` and returns
    ``{hook: {threshold: summary}}`` (:func:`mechscope.apps.tables.format_graph_summary` shows them as a table)."""
    an = config.analysis
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    out: dict[str, dict[float, dict]] = {}
    jobs = [(hook, t) for hook in saes for t in config.counting.activation_thresholds]
    tokens = {}
    for hook, t in tqdm(jobs, desc="graphs", unit="threshold"):
        s = saes[hook]
        if hook not in tokens:
            tokens[hook] = latent_tokens(s.W_dec, model.W_E, model.W_U, model.tokenizer, k=10)
        c = _counts_for(config, hook, counts)[t]
        j = jaccard(c)
        edge = edge_threshold(j, an.min_subgraph_size, an.max_subgraph_size, method=an.edge_threshold_method)
        graphs = graph_results(
            subgraphs(j, edge.threshold),
            t,
            edge,
            c.activations,
            c.n_tokens,
            include_metrics=an.include_metrics,
            tokens=tokens[hook],
            neuronpedia_id=s.cfg.neuronpedia_id,
            partners=top_cooccurring(j, an.n_cooccurring),
        )
        out.setdefault(hook, {})[t] = save_graphs(
            Path(config.results_dir) / hook,
            graphs,
            skip_subgraph_files=an.skip_subgraph_files,
            output_format=config.output_format,
        )
    save_summaries(config.results_dir, out)
    return out


def load_subgraphs(config: CoocConfig, hook: str, threshold: float) -> list[Subgraph]:
    """The subgraphs the graphs stage found: the saved Jaccard matrix cut at its summary's edge threshold."""
    directory = Path(config.results_dir) / hook
    graphs = load_graph_summary(directory, threshold)
    counted = _counts_for(config, hook, None)[float(threshold)].n_tokens
    if graphs.get("n_tokens") != counted:
        raise ValueError(
            f"{graph_summary_path(directory, threshold)} was built from {graphs.get('n_tokens')} counted tokens, "
            f"but the counts now hold {counted}: run the graphs stage again"
        )
    return subgraphs(load_jaccard(directory, threshold), graphs["edge_threshold"])


# ---- pca ---------------------------------------------------------------------------------------------------------


def run_pca(config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None) -> dict[str, dict[float, list]]:
    """Per hook and threshold: choose candidate subgraphs by size, collect ``n_batches_reconstruction`` batches of
    latents with their tokens, contexts and positions, and ``save_pca_results``. Returns the paths written,
    ``{hook: {threshold: [Path]}}``."""
    counting, pca = config.counting, config.pca
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    rows = pca.n_batches_reconstruction * counting.batch_size_tokens
    store = _store(config, model, list(saes), rows, data_parallel=False)  # rank 0 alone runs the PCA
    batches = store.resumable_batches(counting.batch_size_tokens)
    collected = [rows for rows, _ in islice(batches, pca.n_batches_reconstruction)]
    if not collected:
        raise ValueError(f"the corpus {counting.corpus or 'default'!r} gave no tokens for the PCA: use a larger corpus")
    meta = {key: torch.cat([rows[key] for rows in collected]) for key in ("tokens", "context", "position")}
    out: dict[str, dict[float, list]] = {}
    fold = counting.fold_decoder_norms
    for hook, s in saes.items():
        latents = [encode(s, rows[hook], fold) for rows in collected]
        for t in tqdm(counting.activation_thresholds, desc=f"pca {hook}", unit="threshold"):
            subs = load_subgraphs(config, hook, t)
            candidates = pca_candidates(subs, pca.candidate_sizes, pca.candidates_per_size, config.analysis.random_seed)
            empty = [size for size in pca.candidate_sizes if not candidates.get(size)]
            if empty:
                warnings.warn(f"{hook} @ {t:g}: no subgraph of size {empty} for the PCA", stacklevel=2)
            results = subgraph_pca_results(
                candidates,
                latents,
                meta["tokens"],
                meta["context"],
                meta["position"],
                _decoder(s, fold),
                model.tokenizer,
                t,
                max_examples=pca.max_examples,
            )
            out.setdefault(hook, {})[t] = save_pca_results(Path(config.results_dir) / hook, results)
    return out


# ---- all -----------------------------------------------------------------------------------------------------------


def run_all(config: CoocConfig, model: HookedModel | None = None, sae: SAEs = None) -> dict[str, Any]:
    """Count (resuming), graphs and PCA, loading the model and SAEs once; prints where the results are.

    Returns ``{"counts": ..., "graphs": ..., "pca": ...}`` as the stages return them. Under torchrun every rank
    counts its share and rank 0 alone builds the graphs and the PCA; the other ranks return after the count, with
    empty ``graphs`` and ``pca``.
    """
    model = load_model(config, model)
    saes = load_saes(config, model, sae)
    counts = run_count(config, model, saes)
    if not distributed.is_main():
        return {"counts": counts, "graphs": {}, "pca": {}}
    graphs = run_graphs(config, model, saes, counts=counts)
    pca = run_pca(config, model, saes)
    print(f"Results in {Path(config.results_dir).resolve()}")
    return {"counts": counts, "graphs": graphs, "pca": pca}
