"""Tool "logit_lens": read the residual stream after each layer as if it were the last (nostalgebraist 2020).

Each residual ``r`` (``blocks.L.hook_resid_post`` by default, optionally ``hook_resid_pre`` and
``hook_resid_mid``) goes through the model's own final norm, with its weights, and unembedding, plus Gemma
2's final logit soft-cap, so the lens at the last layer's ``resid_post`` is exactly the model's output.
See ``docs/tools/logit_lens.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechscope.models.names import get_act_name
from mechscope.models.tokenizer import Input
from mechscope.tools import BaseInterpretabilityTool
from mechscope.tools.inputs import as_tokens, check_layer, check_position, check_token_ids

SITES = ("resid_pre", "resid_mid", "resid_post")


class LogitLens(BaseInterpretabilityTool):
    """Logit lens over layers (tool ``"logit_lens"``)."""

    def _points(self, sites: Sequence[str], layers: Sequence[int] | None) -> list[str]:
        """Hook names in forward order: for each layer, the requested sites in the order pre, mid, post."""
        if isinstance(sites, str):
            sites = [sites]
        unknown = [s for s in sites if s not in SITES]
        if unknown or not sites:
            raise ValueError(f"sites={list(sites)!r}: choose among {SITES}")
        layers = range(self.model.cfg.n_layers) if layers is None else [check_layer(self.model, i) for i in layers]
        # resolve() raises with the closest names, e.g. for resid_mid in parallel-block models
        return [self.model.points.resolve(get_act_name(s, i))[0] for i in layers for s in SITES if s in sites]

    def apply_unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., d_vocab]`` (float32) of residual vectors ``[..., d_model]``: the model's final norm
        (weights and bias included), its unembedding, and the final soft-cap ``c·tanh(logits / c)`` of
        models that have one (Gemma 2, ``cfg.output_logits_soft_cap``)."""
        model = self.model
        with torch.no_grad():
            logits = model.unembed(model.ln_final(resid.to(model.device))).float()
        cap = model.cfg.output_logits_soft_cap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits

    def layer_logits(
        self,
        input_ids: Input,
        sites: str | Sequence[str] = ("resid_post",),
        layers: Sequence[int] | None = None,
        position: int | None = -1,
    ) -> tuple[list[str], torch.Tensor]:
        """``(labels, logits)``: the lens logits at each hook point, ``[n_points, batch, d_vocab]`` at one
        ``position`` or ``[n_points, batch, pos, d_vocab]`` when ``position`` is None.

        ``labels`` are the hook names, for each layer of ``layers`` (default: all) the ``sites`` among
        ``resid_pre``, ``resid_mid``, ``resid_post`` in forward order.
        """
        names = self._points(sites, layers)
        tokens = as_tokens(self.model, input_ids)
        if position is not None:
            position = check_position(position, tokens.shape[1])
        _, cache = self.model.run_with_cache(tokens, names_filter=names, stop_at_layer=self.model.stop_layer_for(names))
        resid = torch.stack([cache[name] if position is None else cache[name][:, position] for name in names])
        return names, self.apply_unembed(resid)  # one matmul: W_U is read once, not once per point

    def logit_lens(
        self,
        input_ids: Input,
        target_ids: int | torch.Tensor | None = None,
        k: int = 5,
        position: int = -1,
        sites: str | Sequence[str] = ("resid_post",),
        layers: Sequence[int] | None = None,
    ) -> dict[str, object]:
        """Top-``k`` tokens, and the target token's probability and rank, at each hook point.

        Returns ``labels`` (hook names, ``n_points``), ``probs`` ``[n_points, batch, d_vocab]``, ``top_k_ids``
        and ``top_k_probs`` ``[n_points, batch, k]``, ``top_k_tokens`` (strings, ``[n_points][batch][k]``) and,
        with ``target_ids`` (one id, or one per sequence ``[batch]``), ``target_prob`` and ``target_rank``
        ``[n_points, batch]``; rank 0 is the most likely token (rank = number of tokens with a strictly
        higher probability).
        """
        labels, logits = self.layer_logits(input_ids, sites, layers, position)
        probs = logits.softmax(-1)
        if not 1 <= k <= probs.shape[-1]:
            raise ValueError(f"k={k} must be between 1 and d_vocab={probs.shape[-1]}")
        top_probs, top_ids = probs.topk(k, dim=-1)
        out: dict[str, object] = {
            "labels": labels,
            "probs": probs,
            "top_k_ids": top_ids,
            "top_k_probs": top_probs,
            "top_k_tokens": [[self.model.to_str_tokens(row) for row in point] for point in top_ids.cpu()],
        }
        if target_ids is not None:
            target = check_token_ids(self.model, target_ids, "target_ids").to(probs.device)
            if target.ndim > 1 or target.numel() not in (1, probs.shape[1]):
                raise ValueError(
                    f"target_ids has shape {tuple(target.shape)}: give one id, or one per sequence [{probs.shape[1]}]"
                )
            target = target.reshape(-1).expand(probs.shape[1])
            p = probs.gather(-1, target[None, :, None].expand(len(labels), -1, 1))  # [n_points, batch, 1]
            out["target_prob"] = p[..., 0]
            out["target_rank"] = (probs > p).sum(-1)
        return out
