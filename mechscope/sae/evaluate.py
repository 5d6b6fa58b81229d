"""``evaluate_sae``: how well an SAE reconstructs a model's activations, and what splicing it in costs the model.

Over every non-padding token of the evaluation set (and, by default, not BOS/EOS/PAD: ``exclude_special``), with
``x`` the activation at the SAE's hook point, ``x_hat`` its reconstruction and ``z`` its latents:

- ``l0``: mean number of non-zero latents per token;
- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (mean over all tokens);
- ``mse``: mean of ``(x - x_hat)^2`` over tokens and dimensions; ``cosine``: mean over tokens of ``cos(x, x_hat)``;
- ``ce_clean`` / ``ce_sae`` / ``ce_zero``: mean next-token cross-entropy of the clean model, of the model with the
  activation replaced by ``x_hat``, and with it replaced by zeros; ``ce_recovered = (ce_zero - ce_sae) /
  (ce_zero - ce_clean)`` (1: as good as clean, 0: as bad as zero-ablation; NaN when the two are equal);
- ``kl``: mean over every non-padding position of ``KL(p_clean || p_sae)`` of the next-token distributions (nats);
- ``dead_share``: share of latents that never fire; ``dense_share``: share firing on more than ``dense_threshold``
  of the tokens; ``density``: histogram of ``log10`` firing frequency of the latents that fire at least once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

import mechscope.distributed as distributed
from mechscope.models.hooked import HookedModel, lm_loss
from mechscope.models.hooks import HookPoint
from mechscope.models.points import token_vectors
from mechscope.models.tokenizer import tokenize
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.splice import check_trained_hook, check_width, resolve_hook_name


@dataclass
class LatentDensity:
    """Histogram of ``log10`` firing frequency over the latents that fire at least once.

    ``counts [bins]`` latents per bin, ``bin_edges [bins + 1]`` in log10 units, spanning ``log10(1 / n_tokens)``
    (fired once) to 0 (fired on every token); ``n_dead`` latents never fired and are not in any bin.
    """

    counts: np.ndarray
    bin_edges: np.ndarray
    n_dead: int


@dataclass
class SAEEvaluation:
    """What :func:`evaluate_sae` returns (see the module docstring for each metric).

    ``firing_counts [d_sae]`` is the number of tokens each latent fired on; ``n_tokens`` the tokens evaluated.
    """

    hook_name: str
    n_tokens: int
    l0: float
    fvu: float
    mse: float
    cosine: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    kl: float
    dead_share: float
    dense_share: float
    dense_threshold: float
    firing_counts: Tensor
    density: LatentDensity

    def to_dict(self) -> dict[str, Any]:
        """The scalar metrics as a plain dict (for JSON logs and tables)."""
        return {k: v for k, v in asdict(self).items() if k not in ("firing_counts", "density")}

    def plot_density(self, path: str | Path, title: str | None = None) -> Path:
        """Save the latent density histogram as a PNG at ``path``; returns the path."""
        return plot_latent_density(self.density, path, title=title or f"latent density at {self.hook_name}")


def plot_latent_density(density: LatentDensity, path: str | Path, title: str = "latent density") -> Path:
    """Draw ``density`` (a bar per bin, dead latents in the title) and save it as a PNG at ``path``."""
    path = Path(path)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    edges = density.bin_edges
    ax.bar(edges[:-1], density.counts, width=np.diff(edges), align="edge", edgecolor="none")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({density.n_dead} dead)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """``module.eval()`` inside the block (BatchTopK SAEs then encode token by token), the old mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class _Totals:
    """Running sums over token batches; float64, with the variance combined by Chan's parallel formula."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.mean: Tensor | None = None  # mean activation [d_in], float64
        self.m2 = 0.0  # sum ||x - mean||^2
        self.sq_err = self.cos = self.l0 = self.kl = 0.0
        self.firing = torch.zeros(d_sae, dtype=torch.long)
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.n_pred = 0
        self.n_kl = 0  # positions the KL is summed over: every real one, special tokens included

    def add_activations(self, x: Tensor, x_hat: Tensor, latents: Tensor) -> None:
        """``x``, ``x_hat [tokens, d_in]`` and ``latents [tokens, d_sae]`` of one batch's real tokens."""
        x, x_hat = x.double(), x_hat.double()
        mean_b = x.mean(dim=0)
        self._add_moments(x.shape[0], mean_b.cpu(), float((x - mean_b).pow(2).sum()))
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.cos += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        active = latents != 0
        self.l0 += float(active.sum())
        self.firing += active.sum(dim=0).cpu()

    def _add_moments(self, n_b: int, mean_b: Tensor | None, m2_b: float) -> None:
        """Add ``n_b`` tokens of mean ``mean_b [d_in]`` and sum of squared deviations ``m2_b`` (Chan et al.)."""
        if mean_b is None:
            return
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            delta = mean_b - self.mean
            total = self.n + n_b
            self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * n_b / total
            self.mean = self.mean + delta * n_b / total
        self.n += n_b

    def merged(self, other: _Totals) -> _Totals:
        """These totals with ``other``'s (another rank's batches) added; ``self`` is updated and returned."""
        self._add_moments(other.n, other.mean, other.m2)
        self.sq_err += other.sq_err
        self.cos += other.cos
        self.l0 += other.l0
        self.kl += other.kl
        self.firing += other.firing
        self.ce = {k: v + other.ce[k] for k, v in self.ce.items()}
        self.n_pred += other.n_pred
        self.n_kl += other.n_kl
        return self


def _put(where: Tensor, value: Tensor | float) -> Callable[[Tensor, HookPoint], Tensor]:
    """A hook setting the activation to ``value`` where ``where`` ([batch, pos, 1, ...]) is True."""
    return lambda activation, hook: torch.where(where, value, activation)


Tokens = Tensor | Sequence[str]  # [batch, pos] token ids, or texts the model tokenises


@overload
def evaluate_sae(
    model: HookedModel,
    sae: SparseAutoencoder,
    hook_name: str | None,
    tokens: Tokens,
    *,
    batch_size: int = 8,
    dense_threshold: float = 0.1,
    bins: int = 50,
    exclude_special: bool = True,
    progress: bool = True,
    allow_hook_mismatch: bool = False,
) -> SAEEvaluation: ...


@overload
def evaluate_sae(
    model: HookedModel,
    sae: SparseAutoencoder,
    *,
    tokens: Tokens,
    hook_name: str | None = None,
    batch_size: int = 8,
    dense_threshold: float = 0.1,
    bins: int = 50,
    exclude_special: bool = True,
    progress: bool = True,
    allow_hook_mismatch: bool = False,
) -> SAEEvaluation: ...


@torch.no_grad()
def evaluate_sae(
    model: HookedModel,
    sae: SparseAutoencoder,
    hook_name: str | None = None,
    tokens: Tokens | None = None,
    *,
    batch_size: int = 8,
    dense_threshold: float = 0.1,
    bins: int = 50,
    exclude_special: bool = True,
    progress: bool = True,
    allow_hook_mismatch: bool = False,
) -> SAEEvaluation:
    """Evaluate ``sae`` at ``hook_name`` (default ``sae.cfg.hook_name``) of ``model`` on ``tokens``:
    ``evaluate_sae(model, sae, hook_name, tokens)`` or ``evaluate_sae(model, sae, tokens=tokens)``.

    ``tokens`` (required: the overloads say so to a type checker, and a call without them raises a TypeError) is
    ``[batch, pos]`` token ids or a list of texts (tokenised by the model; padding is masked out of every metric).
    Sequences are run ``batch_size`` at a time, three forward passes each: clean, with
    the SAE's reconstruction spliced in, and with the activation zero-ablated. With ``exclude_special`` (the default,
    as SAE training leaves them out too) the BOS/EOS/PAD positions keep their clean activation in the spliced and
    ablated passes and are left out of the activation metrics (l0, fvu, mse, cosine, densities): the residual
    stream at BOS is typically hundreds of times larger than elsewhere and would dominate them. The CE losses and
    the KL are over every prediction. ``dense_threshold`` is the firing
    frequency above which a latent counts as dense; ``bins`` the number of bins of the density histogram. The SAE
    runs in eval mode (its mode is restored afterwards). An SAE whose ``cfg.hook_name`` is another hook than
    ``hook_name`` is refused (a hook of the same width would give figures of the wrong thing) unless
    ``allow_hook_mismatch`` says it is on purpose. Returns an :class:`SAEEvaluation`.

    Under torchrun (:mod:`mechscope.distributed`) rank ``r`` runs every ``world_size``-th batch from the ``r``-th
    and the sums are combined, so every rank returns the figures one process gives (the counts exactly, the float
    sums up to their order of addition, ~1e-15 relative).
    """
    name = resolve_hook_name(sae, hook_name)
    check_trained_hook(sae, name, allow_hook_mismatch)
    if tokens is None:
        raise TypeError("evaluate_sae needs tokens: pass tokens=[batch, pos] token ids or a list of texts")
    if not 0 < dense_threshold < 1:
        raise ValueError(f"dense_threshold is a firing frequency in (0, 1), got {dense_threshold!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ids, mask = tokenize(model.tokenizer, tokens)
    if ids.shape[1] < 2:
        raise ValueError(f"evaluate_sae needs sequences of at least 2 tokens (got [batch, pos] = {list(ids.shape)})")
    ids = ids.to(model.device)
    mask = mask.to(model.device) if mask is not None else None
    tok = model.tokenizer
    special_ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None} if exclude_special else set()
    special = torch.tensor(sorted(special_ids), dtype=torch.long, device=ids.device)
    totals = _Totals(sae.cfg.d_sae)
    every = range(0, ids.shape[0], batch_size)
    starts = [every[i] for i in distributed.share(len(every))]  # under torchrun, this rank's batches
    quiet = not progress or len(starts) < 2 or distributed.quiet()
    with _eval_mode(sae):
        for start in tqdm(starts, desc="evaluate SAE", unit="batch", disable=quiet):
            batch = ids[start : start + batch_size]
            batch_mask = mask[start : start + batch_size] if mask is not None else None
            real = batch_mask.bool() if batch_mask is not None else torch.ones_like(batch, dtype=torch.bool)
            keep = real & ~torch.isin(batch, special)  # the positions the SAE is judged on and spliced into
            clean, cache = model.run_with_cache(batch, names_filter=name, attention_mask=batch_mask)
            assert clean is not None  # the logits (run_with_cache returns None only with stop_at_layer)
            activation = cache[name]
            x = token_vectors(activation, name)  # [batch, pos, d_in]
            check_width(sae, x, name)
            out = sae.forward_with_latents(x.to(sae.W_enc.dtype))
            x_hat = out.reconstruction.to(x.dtype)
            where = keep.reshape(*keep.shape, *([1] * (activation.ndim - 2)))  # [batch, pos, 1, ...]
            spliced_in = _put(where, x_hat.view(activation.shape))
            with_sae = model.run_with_hooks(batch, fwd_hooks=[(name, spliced_in)], attention_mask=batch_mask)
            zero = model.run_with_hooks(batch, fwd_hooks=[(name, _put(where, 0.0))], attention_mask=batch_mask)
            totals.add_activations(x[keep], x_hat[keep], out.latents[keep])
            # lm_loss is a mean over the batch's predictions: weight it by their number so batches average exactly
            n_pred = int((real[:, 1:] & real[:, :-1]).sum())
            if n_pred:  # a batch of one-token texts predicts nothing (and lm_loss would be 0 / 0)
                for key, logits in (("clean", clean), ("sae", with_sae), ("zero", zero)):
                    totals.ce[key] += float(lm_loss(logits, batch, batch_mask)) * n_pred
                totals.n_pred += n_pred
            log_p, log_q = clean.float().log_softmax(dim=-1), with_sae.float().log_softmax(dim=-1)
            kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)  # KL(p || q) [batch, pos]
            totals.kl += float(kl[real].double().sum())
            totals.n_kl += int(real.sum())
    totals = distributed.combine_all(totals, _Totals.merged)  # under torchrun, every rank's sums, on every rank
    return _summarise(totals, name, dense_threshold, bins)


def _summarise(t: _Totals, hook_name: str, dense_threshold: float, bins: int) -> SAEEvaluation:
    if t.mean is None:
        raise ValueError(
            "evaluate_sae found no token to judge the SAE on: every position is padding or a special token "
            "(pass longer texts, or exclude_special=False)"
        )
    n, d_in = t.n, t.mean.numel()
    ce = {k: v / t.n_pred for k, v in t.ce.items()}
    gap = ce["zero"] - ce["clean"]
    freq = t.firing.double() / n
    alive = freq[freq > 0]
    counts, edges = np.histogram(alive.log10().numpy(), bins=bins, range=(math.log10(1 / n), 0.0))
    return SAEEvaluation(
        hook_name=hook_name,
        n_tokens=n,
        l0=t.l0 / n,
        fvu=t.sq_err / t.m2 if t.m2 > 0 else math.nan,
        mse=t.sq_err / (n * d_in),
        cosine=t.cos / n,
        ce_clean=ce["clean"],
        ce_sae=ce["sae"],
        ce_zero=ce["zero"],
        ce_recovered=(ce["zero"] - ce["sae"]) / gap if gap != 0 else math.nan,
        kl=t.kl / t.n_kl,
        dead_share=float((freq == 0).double().mean()),
        dense_share=float((freq > dense_threshold).double().mean()),
        dense_threshold=dense_threshold,
        firing_counts=t.firing,
        density=LatentDensity(counts=counts, bin_edges=edges, n_dead=int((freq == 0).sum())),
    )


__all__ = ["LatentDensity", "SAEEvaluation", "evaluate_sae", "plot_latent_density"]
