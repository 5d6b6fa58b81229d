"""Tool "patching": activation patching and attribution patching from a clean to a corrupted run.

Activation patching runs the corrupted input while copying one slice of one activation from the clean run,
and reports ``metric(logits)`` for every slice (a cell of a grid). Attribution patching approximates every
cell at once with one forward and backward pass on the corrupted run (Nanda 2023):

    metric(patched) - metric(corrupted) ≈ Σ_cell (clean_act - corrupt_act) · ∂metric/∂act |_corrupted

A metric is a function of the logits ``[batch, pos, d_vocab]`` returning a scalar tensor; see
:func:`logit_diff` and :func:`target_prob`. See ``docs/tools/patching.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mechscope.models.names import block_hook, get_act_name
from mechscope.models.tokenizer import Input, tokenize
from mechscope.tools import BaseInterpretabilityTool
from mechscope.tools.inputs import metric_value

Metric = Callable[[torch.Tensor], torch.Tensor]

#: which activation dimensions (after batch) a grid runs over, per ``over`` value
_GRID_DIMS = {"all": (), "pos": (1,), "head": (2,), "pos_head": (1, 2)}
#: layer-wise residual-stream sites accepted by :meth:`ActivationPatching.patch_layers`
LAYER_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def _per_sequence(ids: int | Sequence[int] | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=logits.device).reshape(-1)
    return ids.expand(logits.shape[0]) if ids.numel() == 1 else ids


def logit_diff(answer: int | Sequence[int], wrong: int | Sequence[int], position: int = -1) -> Metric:
    """Metric: mean over the batch of ``logits[b, position, answer_b] - logits[b, position, wrong_b]``.

    ``answer`` and ``wrong`` are one token id, or one per sequence.
    """

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, position]
        rows = torch.arange(last.shape[0], device=last.device)
        return (last[rows, _per_sequence(answer, last)] - last[rows, _per_sequence(wrong, last)]).mean()

    return metric


def target_prob(target: int | Sequence[int], position: int = -1) -> Metric:
    """Metric: mean over the batch of ``softmax(logits[b, position])[target_b]``."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        probs = logits[:, position].float().softmax(-1)
        return probs[torch.arange(probs.shape[0], device=probs.device), _per_sequence(target, probs)].mean()

    return metric


def _cells(shape: torch.Size, over: str) -> tuple[tuple[int, ...], list[tuple]]:
    """Grid shape and, per cell in row-major order, the index of its slice of an activation of ``shape``."""
    if over not in _GRID_DIMS:
        raise ValueError(f"over={over!r} is not a grid: use one of {', '.join(_GRID_DIMS)}")
    dims = _GRID_DIMS[over]
    if 2 in dims and len(shape) != 4:
        raise ValueError(
            f"over={over!r} needs an activation with a head dimension ([batch, pos, head, ...]); "
            f"this one has shape {tuple(shape)}: use over='pos' or 'all'"
        )
    grid = tuple(shape[d] for d in dims)
    cells = []
    for idx in itertools.product(*(range(n) for n in grid)):
        index: list = [slice(None)] * (max(dims, default=0) + 1)
        for d, i in zip(dims, idx, strict=True):
            index[d] = i
        cells.append(tuple(index))
    return grid, cells


class ActivationPatching(BaseInterpretabilityTool):
    """Activation patching and attribution patching (tool ``"patching"``).

    ``clean`` and ``corrupted`` are token ids of the same shape ``[batch, pos]`` (or ``[pos]``, or texts of
    equal length in tokens). Grids over ``over="pos"`` are ``[pos]`` per hook point, ``"head"`` ``[head]``
    (for ``[batch, pos, head, d_head]`` points such as ``attn.hook_z``), ``"pos_head"`` ``[pos, head]``,
    ``"all"`` a scalar (the whole activation). Every cell is patched in every sequence of the batch.
    """

    # ---- inputs ------------------------------------------------------------------------------------
    def _pair(self, clean: Input, corrupted: Input) -> tuple[torch.Tensor, torch.Tensor]:
        pair = []
        for what, x in (("clean", clean), ("corrupted", corrupted)):
            tokens, mask = tokenize(self.model.tokenizer, x)
            if mask is not None:
                raise ValueError(f"the {what} sequences have different lengths; pass equal-length token ids")
            pair.append(tokens.to(self.model.device))
        if pair[0].shape != pair[1].shape:
            raise ValueError(
                f"clean {tuple(pair[0].shape)} and corrupted {tuple(pair[1].shape)} must have the same shape "
                "(pad or trim the prompts so their tokens line up)"
            )
        return pair[0], pair[1]

    def _layer_names(self, site: str) -> list[str]:
        if site not in LAYER_SITES:
            raise ValueError(f"site={site!r} is not a layer site: use one of {', '.join(LAYER_SITES)}")
        return [get_act_name(site, layer) for layer in range(self.model.cfg.n_layers)]

    def _head_names(self) -> list[str]:
        return [block_hook(layer, "attn.hook_z") for layer in range(self.model.cfg.n_layers)]

    # ---- activation patching -----------------------------------------------------------------------
    @torch.no_grad()
    def patch_points(
        self, clean: Input, corrupted: Input, metric: Metric, hook_names: Sequence[str], over: str = "pos"
    ) -> torch.Tensor:
        """``[len(hook_names), *grid]``: the metric of the corrupted run with each cell patched from clean."""
        clean, corrupted = self._pair(clean, corrupted)
        _, cache = self.model.run_with_cache(clean, names_filter=list(hook_names))
        rows = []
        for name in hook_names:
            grid, cells = _cells(cache[name].shape, over)
            values = []
            for index in tqdm(cells, desc=f"patching {name}", leave=False):

                def patch(act: torch.Tensor, hook, index=index, name=name) -> torch.Tensor:
                    act[index] = cache[name][index]
                    return act

                values.append(metric_value(metric(self.model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))))
            rows.append(torch.tensor(values).reshape(grid))
        return torch.stack(rows)

    def patch_point(self, clean: Input, corrupted: Input, metric: Metric, hook_name: str, over: str = "pos"):
        """The grid (``[*grid]``) of one hook point; see :meth:`patch_points`."""
        return self.patch_points(clean, corrupted, metric, [hook_name], over)[0]

    def patch_layers(self, clean: Input, corrupted: Input, metric: Metric, site: str = "resid_pre") -> torch.Tensor:
        """``[n_layers, pos]``: patch ``blocks.L.hook_{site}`` at one position (site in :data:`LAYER_SITES`)."""
        return self.patch_points(clean, corrupted, metric, self._layer_names(site), "pos")

    def patch_heads(self, clean: Input, corrupted: Input, metric: Metric, per_position: bool = False) -> torch.Tensor:
        """``[n_layers, n_heads]`` (``[n_layers, pos, n_heads]`` with ``per_position``): patch ``attn.hook_z``."""
        return self.patch_points(clean, corrupted, metric, self._head_names(), "pos_head" if per_position else "head")

    @torch.no_grad()
    def metric_baselines(self, clean: Input, corrupted: Input, metric: Metric) -> dict[str, float]:
        """``{"clean": metric(clean logits), "corrupted": metric(corrupted logits)}``."""
        clean, corrupted = self._pair(clean, corrupted)
        return {
            "clean": metric_value(metric(self.model(clean))),
            "corrupted": metric_value(metric(self.model(corrupted))),
        }

    # ---- attribution patching ----------------------------------------------------------------------
    def attribute_points(
        self, clean: Input, corrupted: Input, metric: Metric, hook_names: Sequence[str], over: str = "pos"
    ) -> torch.Tensor:
        """``[len(hook_names), *grid]``: the linear estimate of :meth:`patch_points` minus the corrupted metric.

        Cell value: ``Σ (clean_act - corrupt_act) * ∂metric/∂act`` over the cell's slice (every sequence of
        the batch, every feature), with the gradient taken on the corrupted run.
        """
        clean, corrupted = self._pair(clean, corrupted)
        names = list(hook_names)
        with torch.no_grad():
            _, clean_cache = self.model.run_with_cache(clean, names_filter=names)
        acts: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}

        def keep_act(act: torch.Tensor, hook) -> None:
            acts[hook.name] = act.detach()

        def keep_grad(grad: torch.Tensor, hook) -> None:
            grads[hook.name] = grad.detach()

        with torch.enable_grad():
            logits = self.model.run_with_hooks(
                corrupted, fwd_hooks=[(n, keep_act) for n in names], bwd_hooks=[(n, keep_grad) for n in names]
            )
            value = metric(logits)
            metric_value(value)  # one number, or a clear error before backward
            value.backward()
        self.model.zero_grad(set_to_none=True)
        rows = []
        for name in names:
            if name not in grads:
                raise RuntimeError(f"no gradient reached {name}: the metric does not depend on it")
            product = (clean_cache[name] - acts[name]) * grads[name]
            grid, _ = _cells(product.shape, over)
            keep = _GRID_DIMS[over]
            rows.append(product.sum(dim=[d for d in range(product.ndim) if d not in keep]).reshape(grid).cpu())
        return torch.stack(rows)

    def attribute_point(self, clean: Input, corrupted: Input, metric: Metric, hook_name: str, over: str = "pos"):
        """The attribution grid (``[*grid]``) of one hook point; see :meth:`attribute_points`."""
        return self.attribute_points(clean, corrupted, metric, [hook_name], over)[0]

    def attribute_layers(self, clean: Input, corrupted: Input, metric: Metric, site: str = "resid_pre") -> torch.Tensor:
        """``[n_layers, pos]``: attribution patching of ``blocks.L.hook_{site}`` per position."""
        return self.attribute_points(clean, corrupted, metric, self._layer_names(site), "pos")

    def attribute_heads(
        self, clean: Input, corrupted: Input, metric: Metric, per_position: bool = False
    ) -> torch.Tensor:
        """``[n_layers, n_heads]`` (or ``[n_layers, pos, n_heads]``): attribution patching of ``attn.hook_z``."""
        return self.attribute_points(
            clean, corrupted, metric, self._head_names(), "pos_head" if per_position else "head"
        )
