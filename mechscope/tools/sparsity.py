"""Tool "sparsity": how sparse the activations at each hook point are, over a batch of inputs.

For every hook point and every token ``x [d]`` (padding excluded): exact zeros, near zeros (``|x| <= eps``),
L0 (entries with ``|x| > eps``), mean ``|x|``, the kurtosis of the entries of ``x``, and per feature how often
it is active; for ``mlp.hook_post`` that is each neuron's firing frequency, and neurons that never fire are
dead. Statistics are accumulated batch by batch, so the corpus need not fit in memory.
See ``docs/tools/sparsity.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypedDict

import torch
from tqdm.auto import tqdm

from mechscope.models.names import block_hook, is_attention_map, parse_hook
from mechscope.models.tokenizer import Input, tokenize
from mechscope.tools import BaseInterpretabilityTool
from mechscope.tools.inputs import check_nonnegative

#: points of every block measured when no names are given
DEFAULT_POINTS = ("hook_attn_out", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


class SparsityStats(TypedDict):
    """The statistics of one hook point; see :meth:`SparsityTools.activation_sparsity`."""

    n_tokens: int
    zero_fraction: float
    near_zero_fraction: float
    l0_per_token: torch.Tensor
    l0: float
    mean_abs: float
    kurtosis: float
    frequency: torch.Tensor
    dead: torch.Tensor


class _Stats:
    """Running sums for one hook point; tokens arrive as ``[n, d]``."""

    def __init__(self, d: int, eps: float):
        self.eps = eps
        self.n_tokens = 0
        self.zeros = 0
        self.near_zeros = 0
        self.abs_sum = 0.0
        self.kurtosis_sum = 0.0
        self.kurtosis_tokens = 0  # tokens with non-zero variance (kurtosis is undefined for constant ones)
        self.active = torch.zeros(d, dtype=torch.long)
        self.l0: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        active = x.abs() > self.eps
        self.n_tokens += len(x)
        self.zeros += int((x == 0).sum())
        self.near_zeros += int((~active).sum())
        self.abs_sum += float(x.abs().sum())
        centred = x - x.mean(-1, keepdim=True)
        var = centred.pow(2).mean(-1)
        varying = var > 0
        self.kurtosis_sum += float((centred[varying].pow(4).mean(-1) / var[varying].pow(2)).sum())
        self.kurtosis_tokens += int(varying.sum())
        self.active += active.sum(0).cpu()
        self.l0.append(active.sum(-1).cpu())

    def result(self) -> SparsityStats:
        entries = self.n_tokens * len(self.active)
        l0 = torch.cat(self.l0)
        frequency = self.active.double() / self.n_tokens
        return {
            "n_tokens": self.n_tokens,
            "zero_fraction": self.zeros / entries,
            "near_zero_fraction": self.near_zeros / entries,
            "l0_per_token": l0,
            "l0": float(l0.double().mean()),
            "mean_abs": self.abs_sum / entries,
            "kurtosis": self.kurtosis_sum / self.kurtosis_tokens if self.kurtosis_tokens else float("nan"),
            "frequency": frequency.float(),
            "dead": (self.active == 0).nonzero()[:, 0],
        }


class SparsityTools(BaseInterpretabilityTool):
    """Activation sparsity per layer and hook point (tool ``"sparsity"``)."""

    def _names(self, hook_names: str | Sequence[str] | Callable[[str], bool] | None) -> list[str]:
        points = self.model.points
        if hook_names is None:
            return [n for n in points.names if parse_hook(n).point in DEFAULT_POINTS]
        if isinstance(hook_names, str) or callable(hook_names):
            return points.resolve(hook_names)  # unknown names raise with the closest valid ones
        return [n for h in hook_names for n in points.resolve(h)]

    def _batches(self, inputs: Input | Iterable[Input]) -> list[Input]:
        """A single input (text, texts, ids ``[batch, pos]``) is one batch; a list of tensors or of lists of
        texts is many."""
        if isinstance(inputs, (str, torch.Tensor)) or (
            isinstance(inputs, list) and all(isinstance(t, (str, int)) for t in inputs)
        ):
            return [inputs]
        return list(inputs)

    def activation_sparsity(
        self,
        inputs: Input | Iterable[Input],
        hook_names: str | Sequence[str] | Callable[[str], bool] | None = None,
        eps: float = 1e-6,
    ) -> dict[str, SparsityStats]:
        """Sparsity statistics per hook point, over every real token of ``inputs``.

        ``inputs``: one batch (text, list of texts, ids ``[batch, pos]``) or an iterable of batches.
        ``hook_names``: names, a predicate, or None for every block's ``hook_attn_out``, ``mlp.hook_post``,
        ``hook_mlp_out`` and ``hook_resid_post``. For each name, with ``x [d]`` one token's activation
        (heads flattened for ``[batch, pos, head, d_head]`` points) and ``N`` tokens:

        - ``zero_fraction``: fraction of entries exactly 0; ``near_zero_fraction``: ``|x| <= eps``;
        - ``l0_per_token`` ``[N]``: ``#{i: |x_i| > eps}``; ``l0``: its mean;
        - ``mean_abs``: mean of ``|x_i|`` over all entries;
        - ``kurtosis``: mean over tokens of ``E[(x_i - m)^4] / E[(x_i - m)^2]^2`` across the ``d`` entries (3 for
          Gaussian entries; large when a few outlier dimensions dominate);
        - ``frequency`` ``[d]``: fraction of tokens with ``|x_i| > eps`` per feature; ``dead``: indices of
          features never active; ``n_tokens``: ``N``.

        Attention patterns and scores (``[batch, head, q, k]``) are not per-token activations and are refused.
        """
        eps = check_nonnegative(eps, "eps")
        names = self._names(hook_names)
        refused = [n for n in names if is_attention_map(n)]
        if refused:
            raise ValueError(f"{refused} are attention maps, not per-token activations; choose other hook points")
        stats: dict[str, _Stats] = {}
        batches = self._batches(inputs)
        stop = self.model.stop_layer_for(names)
        for batch in tqdm(batches, desc="sparsity", disable=len(batches) < 2, leave=False):
            tokens, mask = tokenize(self.model.tokenizer, batch)
            tokens = tokens.to(self.model.device)
            mask = mask.to(self.model.device) if mask is not None else None
            _, cache = self.model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop, attention_mask=mask)
            keep = mask.bool() if mask is not None else torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
            for name in names:
                act = cache[name]
                x = act.reshape(*act.shape[:2], -1)[keep]  # [real tokens, d]
                stats.setdefault(name, _Stats(x.shape[-1], eps)).add(x)
        return {name: s.result() for name, s in stats.items()}

    def neuron_frequency(self, inputs: Input | Iterable[Input], eps: float = 0.0) -> dict[str, torch.Tensor]:
        """MLP neuron firing frequency ``[n_layers, d_mlp]``: fraction of tokens with ``|mlp.hook_post| > eps``,
        and ``dead`` ``[n_layers, d_mlp]`` (bool): neurons that never fired on ``inputs``.

        For ReLU MLPs with ``eps=0`` firing is ``post > 0``. GELU and SiLU outputs are rarely exactly 0, so
        pass a small ``eps`` there.
        """
        names = [block_hook(i, "mlp.hook_post") for i in range(self.model.cfg.n_layers)]
        stats = self.activation_sparsity(inputs, names, eps)
        frequency = torch.stack([stats[n]["frequency"] for n in names])
        return {"frequency": frequency, "dead": frequency == 0}
