"""Feature dashboards of every latent of an SAE, in three streaming passes over stored activations.

1. top-``k`` activating tokens, firing counts (density) and each latent's max activation;
2. uniform samples from ``n_bins`` activation bins under that max, and the activation histograms;
3. the token window around every chosen example, with its latent's activation on each token.

The SAE encodes each chunk of rows once per pass; nothing ``[tokens, d_sae]`` is kept. Each pass's state merges
(:mod:`mechscope.dashboards.selection`), so ranks of a data-parallel run can each take a share of the chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.dashboards.density import ActivationHistograms, FiringCounts
from mechscope.dashboards.logit_effects import LogitEffects, logit_effects
from mechscope.dashboards.selection import BinSamples, Selection, TopExamples
from mechscope.dashboards.windows import Windows
from mechscope.sae.latents import SparseLatents
from mechscope.sae.model import SparseAutoencoder
from mechscope.settings import Config, at_least, check_fields, meta

Chunks = Callable[[], Iterable[Mapping[str, Tensor]]]
"""A fresh iterator over the stored rows at each call: dicts with the hook's ``[n, d_in]`` and ``tokens``,
``context``, ``position`` ``[n]`` (the activation store's shards)."""


@dataclass
class DashboardSettings(Config):
    """What a dashboard run computes per latent (the defaults follow SAEDashboard)."""

    n_top: int = field(default=20, metadata=meta("top-activating examples per latent"))
    window: int = field(default=16, metadata=meta("tokens each side of an example"))
    n_bins: int = field(default=5, metadata=meta("activation bins of the sampled examples"))
    per_bin: int = field(default=5, metadata=meta("examples sampled per bin"))
    histogram_bins: int = field(default=40, metadata=meta("bins of the activation histogram"))
    n_logits: int = field(default=10, metadata=meta("promoted and suppressed tokens per latent"))
    seed: int = field(default=0, metadata=meta("seeds the bin samples"))

    LABEL: ClassVar[str] = "[dashboards]."

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, 1, "n_top", "n_bins", "per_bin", "histogram_bins", "n_logits")
        at_least(self, 0, "window")


@dataclass
class Examples:
    """Examples of each of ``groups`` rows (a latent, or a latent's bin), ``k`` slots each: ``values``,
    ``context``, ``position`` ``[groups, k]`` (unfilled slots: context -1), and the windows ``tokens``
    ``[groups, k, 2w+1]`` (-1 where not stored) and ``activations`` ``[groups, k, 2w+1]``."""

    values: Tensor
    context: Tensor
    position: Tensor
    tokens: Tensor
    activations: Tensor


@dataclass
class Dashboards:
    """Every latent's dashboard data (``d_sae`` latents):

    - ``top``: :class:`Examples` ``[d_sae, n_top, ...]``, most active first;
    - ``bins``: :class:`Examples` ``[d_sae, n_bins, per_bin, ...]`` flattened to ``[d_sae * n_bins, per_bin, ...]``
      (row ``latent * n_bins + bin``), ``bin_edges [d_sae, n_bins + 1]`` and ``bin_counts [d_sae * n_bins]``, the
      tokens in each bin;
    - ``firing [d_sae]`` tokens where each fires, of ``n_tokens``; ``max_activation [d_sae]``;
    - ``histogram [d_sae, histogram_bins]`` counts over ``histogram_edges [d_sae, histogram_bins + 1]``;
    - ``logits``: :class:`~mechscope.dashboards.logit_effects.LogitEffects`.
    """

    settings: DashboardSettings
    top: Examples
    bins: Examples
    bin_edges: Tensor
    bin_counts: Tensor
    firing: Tensor
    n_tokens: int
    max_activation: Tensor
    histogram: Tensor
    histogram_edges: Tensor
    logits: LogitEffects

    @property
    def d_sae(self) -> int:
        return self.firing.numel()

    def density(self) -> Tensor:
        """``[d_sae]``: fraction of tokens where each latent fires."""
        return self.firing.double() / max(self.n_tokens, 1)

    def dead_latents(self) -> Tensor:
        """Indices of the latents that never fired."""
        return (self.firing == 0).nonzero()[:, 0]


def _encoded(sae: SparseAutoencoder, hook_name: str, chunks: Chunks, desc: str, progress: bool):
    with torch.no_grad():
        for rows in tqdm(chunks(), desc=desc, unit="chunk", disable=not progress):
            x = rows[hook_name].to(sae.W_enc.device)
            latents = sae.encode_sparse(x)
            yield SparseLatents(latents.indices.cpu(), latents.values.float().cpu()), rows


def _with_windows(selection: Selection, windows: Windows, start: int) -> Examples:
    filled = selection.filled()
    n = int(filled.sum())
    shape = (*selection.context.shape, windows.tokens.shape[1])
    tokens = torch.full(shape, -1, dtype=torch.long)
    activations = torch.zeros(shape)
    tokens[filled] = windows.tokens[start : start + n]
    activations[filled] = windows.activations[start : start + n]
    return Examples(selection.values, selection.context, selection.position, tokens, activations)


def _examples_of(selection: Selection, groups_per_latent: int) -> tuple[Tensor, Tensor, Tensor]:
    filled = selection.filled()
    latent = torch.arange(selection.context.shape[0])[:, None].expand_as(filled) // groups_per_latent
    return selection.context[filled], selection.position[filled], latent[filled]


def compute_dashboards(
    sae: SparseAutoencoder,
    hook_name: str,
    chunks: Chunks,
    W_U: Tensor,  # noqa: N803 (TransformerLens's name)
    norm_weight: Tensor | None = None,
    settings: DashboardSettings | None = None,
    progress: bool = True,
) -> Dashboards:
    """Dashboards of every latent of ``sae`` over the rows ``chunks()`` yields (three passes; module docstring).

    ``W_U [d_model, d_vocab]`` and ``norm_weight [d_model]`` (the final norm's multiplier, None for none) give the
    logit effects (:func:`~mechscope.dashboards.logit_effects.logit_effects`).
    """
    s = settings or DashboardSettings()
    d_sae = sae.cfg.d_sae
    top, firing = TopExamples(d_sae, s.n_top), FiringCounts(d_sae)
    for latents, rows in _encoded(sae, hook_name, chunks, "dashboards 1/3: top examples", progress):
        top.update(latents, rows["context"], rows["position"])
        firing.update(latents)
    max_activation = top.max_activation()

    bins, histogram = (
        BinSamples(max_activation, s.n_bins, s.per_bin, s.seed),
        ActivationHistograms(max_activation, s.histogram_bins),
    )
    for latents, rows in _encoded(sae, hook_name, chunks, "dashboards 2/3: bins", progress):
        bins.update(latents, rows["context"], rows["position"])
        histogram.update(latents)

    top_examples = _examples_of(top.selection, 1)
    bin_examples = _examples_of(bins.selection, s.n_bins)
    context, position, latent = (torch.cat(parts) for parts in zip(top_examples, bin_examples, strict=True))
    windows = Windows(context, position, latent, window=s.window)
    for latents, rows in _encoded(sae, hook_name, chunks, "dashboards 3/3: windows", progress):
        windows.update(latents, rows["context"], rows["position"], rows["tokens"])

    n_top = top_examples[0].numel()
    return Dashboards(
        settings=s,
        top=_with_windows(top.selection, windows, 0),
        bins=_with_windows(bins.selection, windows, n_top),
        bin_edges=bins.bin_edges(),
        bin_counts=bins.counts,
        firing=firing.counts,
        n_tokens=firing.n_tokens,
        max_activation=max_activation,
        histogram=histogram.counts,
        histogram_edges=histogram.edges(),
        logits=logit_effects(sae.W_dec.detach(), W_U, norm_weight, s.n_logits),
    )
