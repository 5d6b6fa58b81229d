"""The subspace-PCA results of candidate subgraphs: per subgraph its PCA and, per point, the token, a context string
and where it is in the corpus (written as the reference's ``graph_analysis_results_size_{n}.h5`` files by
:func:`mechscope.cooccurrence.outputs.save_pca_results`).

Every point (a token where the subgraph fires) keeps its PCA coordinates, its token, a context string, the
subgraph latents' activations and the strongest latent of the whole SAE; every subgraph keeps its three most
frequent tokens and an example context.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.cooccurrence.graph import Subgraph
from mechscope.cooccurrence.records import MARK, SubgraphPCAResult, SubspacePCA
from mechscope.cooccurrence.subspace import subgraph_pcas
from mechscope.sae.latents import LatentsLike, as_sparse

if TYPE_CHECKING:  # annotations only: importing transformers takes seconds, and reading results needs none of it
    from transformers import PreTrainedTokenizerBase


def _windows(context: np.ndarray, position: np.ndarray, rows: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` ``[len(rows)]``: the rows of each point's context whose position is within ``window`` of its
    own are ``lo[i]:hi[i]``. ``context`` and ``position`` are ``[n_rows]``; a context's rows must be consecutive
    and in increasing position order."""
    run = np.cumsum(np.r_[0, context[1:] != context[:-1]])  # one id per run of rows of one context
    stride = int(position.max(initial=0)) + 2 * window + 1
    key = run * stride + position + window  # strictly increasing when the rows are ordered as required
    if np.any(np.diff(key) <= 0) or np.any(position < 0):
        raise ValueError("the rows of a context must be consecutive, in increasing position order (positions >= 0)")
    centre = run[rows] * stride + position[rows] + window
    return np.searchsorted(key, centre - window, "left"), np.searchsorted(key, centre + window, "right")


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def context_strings(
    tokenizer: PreTrainedTokenizerBase,
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    rows: np.ndarray,
    window: int,
) -> list[str]:
    """The context string of each row in ``rows``: the tokens of the same context at most ``window`` positions
    away, decoded together, with ``|`` before and after the row's own token (``prefix|token|suffix``).

    ``tokens``, ``context`` and ``position`` are ``[n_rows]``. The window is decoded as a whole, and the marks go
    where the decoded text of the tokens before the point, and up to it, stop agreeing with the whole window; so
    the string without its two marks is exactly the decoded window (a character split across tokens goes to the
    token that completes it). ``rows [n]`` index the rows; the result has ``n`` strings.
    """
    lo, hi = _windows(context, position, rows, window)
    ids = tokens.tolist()

    def decode(stops: np.ndarray) -> list[str]:
        spans = [ids[a:b] for a, b in zip(lo.tolist(), stops.tolist(), strict=True)]
        return tokenizer.batch_decode(spans, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out = []
    for before, upto, whole in zip(decode(rows), decode(rows + 1), decode(hi), strict=True):
        j = _common_prefix(upto, whole)
        i = min(_common_prefix(before, upto), j)
        out.append(f"{whole[:i]}{MARK}{whole[i:j]}{MARK}{whole[j:]}")
    return out


def _describe(
    subgraph_id: int,
    pca: SubspacePCA,
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    window: int,
) -> SubgraphPCAResult:
    """Decode the tokens and contexts of one subgraph's points and find its top tokens and example context."""
    rows = pca.token_index
    token_id = tokens[rows]
    unique = np.unique(token_id)
    pieces = tokenizer.batch_decode([[t] for t in unique.tolist()], clean_up_tokenization_spaces=False)
    token_strs = [pieces[k] for k in np.searchsorted(unique, token_id).tolist()]
    contexts = context_strings(tokenizer, tokens, context, position, rows, window)
    top = Counter(token_strs).most_common(3)  # ties in order of first appearance
    return SubgraphPCAResult(
        subgraph_id=subgraph_id,
        pca=pca,
        token_id=token_id,
        context_id=context[rows],
        position=position[rows],
        tokens=token_strs,
        contexts=contexts,
        top_tokens=[t for t, _ in top],
        top_token_counts=[c for _, c in top],
        example_context=contexts[token_strs.index(top[0][0])],
    )


@dataclass
class PCAResults:
    """The subspace PCAs of one activity threshold's candidate subgraphs: ``by_size`` maps each candidate size (in
    ascending order) to the results of its subgraphs, and the settings they were computed with are kept for the
    files (:func:`~mechscope.cooccurrence.outputs.save_pca_results` writes one per size)."""

    activity_threshold: float
    by_size: dict[int, list[SubgraphPCAResult]]
    max_examples: int
    n_components: int
    context_window: int


def subgraph_pca_results(
    candidates: dict[int, list[Subgraph]],
    latents: Sequence[LatentsLike],
    tokens: Tensor,
    context: Tensor,
    position: Tensor,
    W_dec: Tensor,  # noqa: N803 (the SAE's name for it)
    tokenizer: PreTrainedTokenizerBase,
    activity_threshold: float,
    *,
    max_examples: int = 5000,
    n_components: int = 3,
    context_window: int = 10,
) -> PCAResults:
    """The subspace PCA of every candidate subgraph, with its points' tokens and context strings.

    ``candidates``: size -> subgraphs (see :func:`~mechscope.cooccurrence.pca_candidates`); ``latents``: latent
    activations of consecutive token rows, dense ``[rows, d_sae]`` or sparse ``[rows, k]`` (``SparseLatents`` or
    ``(indices, values)`` pairs);
    ``tokens``, ``context`` (corpus sequence id) and ``position`` (within it): ``[n_rows]`` for the rows of all
    batches concatenated, a context's rows consecutive and in increasing position; ``W_dec [d_sae, d_in]``;
    ``tokenizer`` decodes tokens and contexts. A point is a token where any subgraph latent is ``> 0`` (the first
    ``max_examples``); ``activity_threshold`` is recorded, it does not select points. A subgraph that fires on at
    most ``n_components`` tokens is left out with a warning; every size gets an entry, maybe an empty one.
    """
    token_ids, context_ids, positions = (
        np.asarray(x.detach().cpu().reshape(-1), np.int64) for x in (tokens, context, position)
    )
    sparse = [as_sparse(b) for b in latents]
    n_rows = sum(int(b.values.shape[:-1].numel()) for b in sparse)
    if any(len(x) != n_rows for x in (token_ids, context_ids, positions)):
        lengths = [len(x) for x in (token_ids, context_ids, positions)]
        raise ValueError(f"tokens, context and position need one entry per latent row ({n_rows}), not {lengths}")
    subs = [s for size in sorted(candidates) for s in candidates[size]]
    found = subgraph_pcas(sparse, [s.nodes for s in subs], W_dec, max_examples, n_components)
    pcas = {s.id: pca for s, pca in zip(subs, found, strict=True)}
    by_size: dict[int, list[SubgraphPCAResult]] = {}
    for size in sorted(candidates):
        by_size[size] = []
        for sub in tqdm(candidates[size], desc=f"PCA results, size {size}", leave=False):
            pca = pcas[sub.id]
            if pca is None:
                warnings.warn(f"subgraph {sub.id} fires on too few tokens for a PCA; left out", stacklevel=2)
                continue
            by_size[size].append(_describe(sub.id, pca, token_ids, context_ids, positions, tokenizer, context_window))
    return PCAResults(float(activity_threshold), by_size, max_examples, n_components, context_window)
