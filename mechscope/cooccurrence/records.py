"""The records the co-occurrence stages write and the explorer reads back: plain dataclasses of numpy arrays and
strings, importable without torch, networkx or scipy (so opening results stays quick).

:class:`Partners` come from :func:`~mechscope.cooccurrence.graph.top_cooccurring`, :class:`SubspacePCA` from
:func:`~mechscope.cooccurrence.subspace.subgraph_pca`, :class:`SubgraphPCAResult` from
:func:`~mechscope.cooccurrence.pca_results.subgraph_pca_results`; :mod:`mechscope.cooccurrence.layout` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARK = "|"  # put around the point's token in its context string, as the reference does


@dataclass(frozen=True)
class Partners:
    """Each latent's most co-occurring latents: ``latents [d_sae, n]`` (int64, by Jaccard, largest first, ties by
    smaller index; ``-1`` past a latent's last partner) and their ``jaccard [d_sae, n]`` (float32, 0 past it)."""

    latents: np.ndarray
    jaccard: np.ndarray


@dataclass
class SubspacePCA:
    """PCA of one subgraph's reconstructions over the ``n`` tokens where it fires.

    ``token_index [n]``: row of each token in the concatenated batches; ``activations [n, len(nodes)]``: the
    subgraph latents' activations; ``coords [n, n_components]``; ``components [n_components, d_in]`` (unit rows, each
    signed so its largest-magnitude entry is positive; zero rows beyond ``len(nodes)``, the most dimensions the
    subspace has); ``explained_variance_ratio [n_components]``; per token the strongest latent of the whole SAE:
    ``top_value [n]``, ``top_index [n]``, ``top_in_subgraph [n]`` (bool).
    """

    nodes: list[int]
    token_index: np.ndarray
    activations: np.ndarray
    coords: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    top_value: np.ndarray
    top_index: np.ndarray
    top_in_subgraph: np.ndarray


@dataclass
class SubgraphPCAResult:
    """What the results file holds for one subgraph: its PCA and, per point, where the token is and what it reads.

    ``pca.token_index [n]`` is the point id (row in the concatenated batches); ``token_id``, ``context_id`` and
    ``position`` ``[n]`` locate each token in the corpus; ``tokens [n]`` are the decoded tokens, ``contexts [n]``
    the decoded windows around them with the token between ``|`` marks; ``top_tokens`` / ``top_token_counts``: the
    (at most) 3 most frequent tokens among the points and how often each occurs; ``example_context``: the context
    of the first point whose token is the most frequent one.
    """

    subgraph_id: int
    pca: SubspacePCA
    token_id: np.ndarray
    context_id: np.ndarray
    position: np.ndarray
    tokens: list[str]
    contexts: list[str]
    top_tokens: list[str]
    top_token_counts: list[int]
    example_context: str
