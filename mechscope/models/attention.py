"""The attention function mechscope registers with ``transformers.AttentionInterface``.

Every attention module of a wrapped model calls :func:`hooked_attention` (under the name
``mechscope[<original implementation>]``). When no hook of that layer is active it hands the call
straight to the function transformers would have used (SDPA, eager, ...), so logits stay bitwise equal
and speed is unchanged. When hooks are active it exposes, per layer ``L``:

- on rotary models ``blocks.L.attn.hook_rot_q`` ``[batch, pos, head, d_head]`` (queries after rotary) and
  ``hook_rot_k`` ``[batch, key_pos, kv_head, d_head]`` (keys after rotary, every key position the query sees,
  cached ones included during generation),
- ``blocks.L.attn.hook_attn_scores`` ``[batch, head, query_pos, key_pos]``: scaled, soft-capped where the
  architecture does it, masked with ``-inf``; ``hook_pattern``: their softmax,
- ``blocks.L.attn.hook_z`` ``[batch, pos, head, d_head]``: the per-head weighted sum of values.

``hook_q`` / ``hook_k`` / ``hook_v`` (the projections, before rotary) are served at the projection modules
(:class:`mechscope.models.points.AttnInputSite`).

Scores and pattern are computed explicitly only when hooked; the output is computed from them only
when a hook edited scores or pattern, or a backward hook needs them on the autograd graph.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mechscope.models.hooks import HookRegistry
from mechscope.models.names import ATTN_POINTS, block_hook

_SITE_ATTR = "_mechscope_attn_site"


@dataclass
class AttentionSite:
    """Per-layer state the attention function reads: its hook names, and which of them are active."""

    layer: int
    registry: HookRegistry
    points: tuple[str, ...] = ATTN_POINTS  # the points this layer serves (rotary ones only on rotary models)
    active: frozenset[str] = frozenset()  # points ("attn.hook_z", ...) with a hook attached
    names: dict[str, str] = field(init=False)  # point -> hook name ("attn.hook_z" -> "blocks.L.attn.hook_z")

    def __post_init__(self) -> None:
        self.names = {p: block_hook(self.layer, p) for p in self.points}

    def refresh(self) -> None:
        names = self.registry.active_names()
        self.active = frozenset(p for p, name in self.names.items() if name in names)


def attach_site(module: torch.nn.Module, site: AttentionSite | None) -> None:
    """Attach (or with ``None`` detach) the hook state of one attention module."""
    if site is None:
        module.__dict__.pop(_SITE_ATTR, None)
    else:
        module.__dict__[_SITE_ATTR] = site


def _delegate(original: str, module: torch.nn.Module) -> Callable:
    if original != "eager" and original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    return sys.modules[type(module).__module__].eager_attention_forward


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[batch, kv_heads, pos, d]`` -> ``[batch, n_heads, pos, d]`` (grouped-query attention)."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention scores ``[batch, head, q, k]``: scaled, soft-capped, and masked with ``-inf``.

    ``mask`` is what the model's mask function produced: ``None`` (causal, aligned to the last key),
    a boolean mask (True = attend) or an additive float mask.
    """
    key = _repeat_kv(key, query.shape[1])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        q_len, k_len = scores.shape[-2:]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        return scores.masked_fill(~allowed, float("-inf"))
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask[..., : key.shape[-2]], float("-inf"))
    mask = mask[..., : key.shape[-2]]
    return (scores + mask).masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))


def pattern_from_scores(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over keys in float32; rows with every key masked give zeros rather than NaN."""
    return torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(dtype)


def hooked_attention(
    original: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with hook points; shapes as transformers passes them (``[batch, heads, pos, d_head]``)."""
    delegate = _delegate(original, module)
    site: AttentionSite | None = module.__dict__.get(_SITE_ATTR)
    if site is None or not site.active:
        return delegate(module, query, key, value, attention_mask, **kwargs)

    run, active, names = site.registry, site.active, site.names
    edited_qk = False
    if "attn.hook_rot_q" in active:
        q_, e = run(names["attn.hook_rot_q"], query.transpose(1, 2))
        query, edited_qk = q_.transpose(1, 2), edited_qk or e
    if "attn.hook_rot_k" in active:
        k_, e = run(names["attn.hook_rot_k"], key.transpose(1, 2))
        key, edited_qk = k_.transpose(1, 2), edited_qk or e
    if edited_qk:
        # transformers' kernels expect contiguous [batch, heads, pos, d] layouts.
        query, key = query.contiguous(), key.contiguous()

    explicit = False
    if "attn.hook_attn_scores" in active or "attn.hook_pattern" in active:
        scores_name, pattern_name = names["attn.hook_attn_scores"], names["attn.hook_pattern"]
        scores = masked_scores(query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
        scores, e_scores = run(scores_name, scores) if "attn.hook_attn_scores" in active else (scores, False)
        pattern = pattern_from_scores(scores, query.dtype)
        pattern, e_pattern = run(pattern_name, pattern) if "attn.hook_pattern" in active else (pattern, False)
        explicit = e_scores or e_pattern or run.has_bwd(scores_name) or run.has_bwd(pattern_name)
    if explicit:
        z = torch.matmul(pattern, _repeat_kv(value, query.shape[1])).transpose(1, 2)
        weights = pattern
    else:
        z, weights = delegate(module, query, key, value, attention_mask, **kwargs)
    if "attn.hook_z" in active:
        z, _ = run(names["attn.hook_z"], z)
    return z, weights


def register_attention(original: str) -> str:
    """Register ``mechscope[original]`` (attention and mask functions) and return that name."""
    name = f"mechscope[{original}]"
    if name not in ALL_ATTENTION_FUNCTIONS:

        def attention(module, query, key, value, attention_mask, **kwargs):
            return hooked_attention(original, module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name
