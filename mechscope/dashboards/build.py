"""Feature dashboards of every latent of an SAE, in three streaming passes over stored activations.

1. top-``k`` activating tokens, firing counts (density) and each latent's max activation;
2. uniform samples from ``n_bins`` activation bins under that max, and the activation histograms;
3. the token window around every chosen example, with its latent's activation on each token.

The SAE encodes each chunk of rows once per pass; nothing ``[tokens, d_sae]`` is kept.

Where a run is lives in a :class:`DashboardState`: the pass, the key of the next chunk (the activation store's
``chunks(start)`` keys) and the accumulators so far, all tensors. :func:`compute_dashboards` calls ``on_chunk(state)``
after every chunk (the pipeline checkpoints it there) and continues from a ``resume`` state, so a run resumed from a
state of a killed one gives exactly the uninterrupted result. The pieces are public for ranks of a data-parallel run
(:mod:`mechscope.dashboards.pipeline` under torchrun): each feeds its share of the chunks to the same state
(:func:`feed_chunk`, or :func:`run_pass` over ``chunks(start, step=world_size)``), :meth:`DashboardState.merge` joins
them exactly (every selection breaks ties by the tokens' keys, every count is an integer sum, so the merge of any
split of the chunks is bit for bit the state of one process), :meth:`DashboardState.restart_pass` empties a rank's
pass after rank 0 took its part, :meth:`DashboardState.next_pass` starts the next pass and :func:`finish_dashboards`
ends the third.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

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


class Chunks(Protocol):
    """``chunks(start, step=1)``: a fresh iterator over the stored rows from the chunk keyed ``start`` (0: the
    first), each chunk with the key of the one after it, as :meth:`mechscope.data.store.ActivationStore.chunks`
    gives them. A chunk is a dict with the hook's ``[n, d_in]`` and ``tokens``, ``context``, ``position`` ``[n]``.
    ``step``: every ``step``-th chunk from ``start`` (a rank's share of a data-parallel run; the key of chunk ``i``
    is then ``i + 1``, stored shards and :func:`chunk_list` are keyed so)."""

    def __call__(self, start: int, *, step: int = 1) -> Iterable[tuple[int, Mapping[str, Tensor]]]: ...


def chunk_list(chunks: Sequence[Mapping[str, Tensor]]) -> Chunks:
    """:data:`Chunks` over rows held in memory: chunk ``i`` has key ``i`` (the next one ``i + 1``)."""

    def read(start: int, *, step: int = 1) -> Iterable[tuple[int, Mapping[str, Tensor]]]:
        return zip(itertools.count(start + 1, step), chunks[start::step])

    return read


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


Part = TopExamples | FiringCounts | BinSamples | ActivationHistograms | Windows
PARTS: dict[str, type[Part]] = {
    "top": TopExamples,
    "firing": FiringCounts,
    "bins": BinSamples,
    "histogram": ActivationHistograms,
    "windows": Windows,
}
"""The accumulators of a :class:`DashboardState` by name."""
PASS_PARTS = {1: ("top", "firing"), 2: ("bins", "histogram"), 3: ("windows",)}
"""The accumulators each pass fills."""
N_PASSES = len(PASS_PARTS)
PASS_NAMES = {1: "top examples", 2: "bins", 3: "windows"}


@dataclass
class DashboardState:
    """A dashboard run between two chunks: in pass ``pass_number`` (1 to 3), the next chunk to read has key ``key``
    (0 at the start of every pass); the accumulators of the passes begun so far are set, the others None."""

    settings: DashboardSettings
    pass_number: int
    key: int
    top: TopExamples
    firing: FiringCounts
    bins: BinSamples | None = None
    histogram: ActivationHistograms | None = None
    windows: Windows | None = None

    @classmethod
    def start(cls, d_sae: int, settings: DashboardSettings) -> DashboardState:
        """The state before the first chunk of pass 1."""
        return cls(settings, 1, 0, TopExamples(d_sae, settings.n_top), FiringCounts(d_sae))

    def parts(self) -> dict[str, Part]:
        """The accumulators set so far, by their :data:`PARTS` name."""
        return {name: part for name in PARTS if (part := getattr(self, name)) is not None}

    def tensors(self) -> dict[str, Tensor]:
        """Every accumulator's state as ``"{part}.{name}"`` tensors (not copies); :meth:`from_tensors` reads them."""
        return {f"{name}.{k}": v for name, part in self.parts().items() for k, v in part.state().items()}

    @classmethod
    def from_tensors(
        cls, settings: DashboardSettings, pass_number: int, key: int, tensors: Mapping[str, Tensor]
    ) -> DashboardState:
        """The state whose :meth:`tensors` are ``tensors``, at ``pass_number`` and ``key``."""
        parts: dict[str, Part] = {}
        for name, kind in PARTS.items():
            own = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            if own:
                parts[name] = kind.from_state(own)
        needed = [name for p in range(1, pass_number + 1) for name in PASS_PARTS[p]]
        missing = [name for name in needed if name not in parts]
        if missing:
            raise ValueError(f"a pass {pass_number} dashboard state needs {missing}; it holds {list(parts)}")
        return cls(settings, pass_number, key, **parts)  # type: ignore[arg-type]

    def merge(self, other: DashboardState) -> DashboardState:
        """The state over both states' chunks: ``other`` ran the same pass from the same state over other chunks
        (another rank's share). The parts of earlier passes are the shared ones; ``key`` is this state's."""
        if (other.settings, other.pass_number) != (self.settings, self.pass_number):
            raise ValueError(
                f"dashboard states merge only in the same pass under the same settings: pass {self.pass_number} "
                f"and {other.pass_number}"
            )
        mine, theirs = self.tensors(), other.tensors()
        out = DashboardState.from_tensors(self.settings, self.pass_number, self.key, mine)
        for name, part in out.parts().items():
            if name in PASS_PARTS[self.pass_number]:
                part.merge(getattr(other, name))
            elif any(not torch.equal(v, theirs[k]) for k, v in mine.items() if k.startswith(f"{name}.")):
                raise ValueError(f"the states were not run from the same pass {self.pass_number} start ({name})")
        return out

    def next_pass(self) -> DashboardState:
        """The state before the first chunk of the next pass: pass 2's bins under pass 1's max activations, or
        pass 3's windows around the chosen examples."""
        if self.pass_number == N_PASSES:
            raise ValueError("pass 3 is the last: finish_dashboards(state, ...) makes the dashboards")
        return replace(self, pass_number=self.pass_number + 1, key=0, **self._fresh_parts(self.pass_number + 1))

    def restart_pass(self) -> DashboardState:
        """This state with its pass's accumulators empty again (the earlier passes' kept, ``key`` unchanged): what a
        rank of a data-parallel run goes on from once rank 0 holds the merge of what it had."""
        return replace(self, **self._fresh_parts(self.pass_number))

    def _fresh_parts(self, pass_number: int) -> dict[str, Any]:
        """The empty accumulators of pass ``pass_number``, made from the passes before it (done in this state)."""
        s = self.settings
        if pass_number == 1:
            return {"top": TopExamples(self.top.d_sae, s.n_top), "firing": FiringCounts(self.top.d_sae)}
        if pass_number == 2:
            max_activation = self.top.max_activation()
            bins = BinSamples(max_activation, s.n_bins, s.per_bin, s.seed)
            return {"bins": bins, "histogram": ActivationHistograms(max_activation.clone(), s.histogram_bins)}
        assert self.bins is not None
        tops, binned = _examples_of(self.top.selection, 1), _examples_of(self.bins.selection, s.n_bins)
        context, position, latent = (torch.cat(parts) for parts in zip(tops, binned, strict=True))
        return {"windows": Windows(context, position, latent, window=s.window)}


def _examples_of(selection: Selection, groups_per_latent: int) -> tuple[Tensor, Tensor, Tensor]:
    filled = selection.filled()
    latent = torch.arange(selection.context.shape[0])[:, None].expand_as(filled) // groups_per_latent
    return selection.context[filled], selection.position[filled], latent[filled]


def feed_chunk(state: DashboardState, sae: SparseAutoencoder, hook_name: str, rows: Mapping[str, Tensor]) -> None:
    """Take in one chunk of rows (a :data:`Chunks` item) in ``state``'s pass, the chunk encoded by ``sae`` once;
    ``state`` is updated in place, its ``key`` left as it was."""
    with torch.no_grad():
        encoded = sae.encode_sparse(rows[hook_name].to(sae.W_enc.device))
    latents = SparseLatents(encoded.indices.cpu(), encoded.values.float().cpu())
    context, position = rows["context"], rows["position"]
    if state.pass_number == 1:
        state.top.update(latents, context, position)
        state.firing.update(latents)
    elif state.pass_number == 2:
        assert state.bins is not None and state.histogram is not None
        state.bins.update(latents, context, position)
        state.histogram.update(latents)
    else:
        assert state.windows is not None
        state.windows.update(latents, context, position, rows["tokens"])


def run_pass(
    state: DashboardState,
    sae: SparseAutoencoder,
    hook_name: str,
    chunks: Chunks,
    progress: bool = True,
    on_chunk: Callable[[DashboardState], object] | None = None,
) -> DashboardState:
    """Feed ``state``'s pass every chunk of ``chunks(state.key)`` (:func:`feed_chunk`), updating ``state`` in place
    and calling ``on_chunk(state)`` after each; returns ``state``, its pass done."""
    desc = f"dashboards {state.pass_number}/{N_PASSES}: {PASS_NAMES[state.pass_number]}"
    for key, rows in tqdm(chunks(state.key), desc=desc, unit="chunk", disable=not progress):
        feed_chunk(state, sae, hook_name, rows)
        state.key = key
        if on_chunk is not None:
            on_chunk(state)
    return state


def _with_windows(selection: Selection, windows: Windows, start: int) -> Examples:
    filled = selection.filled()
    n = int(filled.sum())
    shape = (*selection.context.shape, windows.tokens.shape[1])
    tokens = torch.full(shape, -1, dtype=torch.long)
    activations = torch.zeros(shape)
    tokens[filled] = windows.tokens[start : start + n]
    activations[filled] = windows.activations[start : start + n]
    return Examples(selection.values, selection.context, selection.position, tokens, activations)


def finish_dashboards(
    state: DashboardState,
    W_dec: Tensor,  # noqa: N803 (the SAE's name)
    W_U: Tensor,  # noqa: N803 (TransformerLens's name)
    norm_weight: Tensor | None = None,
) -> Dashboards:
    """The dashboards of a state whose third pass is done, with the logit effects of ``W_dec [d_sae, d_model]``
    (:func:`~mechscope.dashboards.logit_effects.logit_effects`)."""
    if state.pass_number != N_PASSES or state.windows is None or state.bins is None or state.histogram is None:
        raise ValueError(f"the dashboards need all {N_PASSES} passes; this state is in pass {state.pass_number}")
    s, top, bins = state.settings, state.top, state.bins
    n_top = int(top.selection.filled().sum())
    return Dashboards(
        settings=s,
        top=_with_windows(top.selection, state.windows, 0),
        bins=_with_windows(bins.selection, state.windows, n_top),
        bin_edges=bins.bin_edges(),
        bin_counts=bins.counts,
        firing=state.firing.counts,
        n_tokens=state.firing.n_tokens,
        max_activation=bins.max_activation,
        histogram=state.histogram.counts,
        histogram_edges=state.histogram.edges(),
        logits=logit_effects(W_dec, W_U, norm_weight, s.n_logits),
    )


def compute_dashboards(
    sae: SparseAutoencoder,
    hook_name: str,
    chunks: Chunks,
    W_U: Tensor,  # noqa: N803 (TransformerLens's name)
    norm_weight: Tensor | None = None,
    settings: DashboardSettings | None = None,
    progress: bool = True,
    *,
    resume: DashboardState | None = None,
    on_chunk: Callable[[DashboardState], object] | None = None,
) -> Dashboards:
    """Dashboards of every latent of ``sae`` over the rows of ``chunks`` (three passes; module docstring).

    ``W_U [d_model, d_vocab]`` and ``norm_weight [d_model]`` (the final norm's multiplier, None for none) give the
    logit effects (:func:`~mechscope.dashboards.logit_effects.logit_effects`). ``resume``: a state an earlier run
    passed to ``on_chunk`` (or its :meth:`~DashboardState.tensors` saved and read back), to continue from; its
    settings are used. ``on_chunk(state)`` is called after every chunk of every pass with the live state (copy
    what you keep: :meth:`~DashboardState.tensors`); an exception it raises ends the run as a kill would, so a test
    can check that resuming from the last state it saw gives the uninterrupted result.
    """
    if resume is not None and settings is not None and resume.settings != settings:
        raise ValueError(f"resume state has settings {resume.settings}, not {settings}: pass the same, or none")
    state = resume if resume is not None else DashboardState.start(sae.cfg.d_sae, settings or DashboardSettings())
    while True:
        state = run_pass(state, sae, hook_name, chunks, progress, on_chunk)
        if state.pass_number == N_PASSES:
            return finish_dashboards(state, sae.W_dec.detach(), W_U, norm_weight)
        state = state.next_pass()
