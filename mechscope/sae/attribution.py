"""What a prompt's active SAE latents do to one target token's logit, and what ablating units changes.

:func:`attribute_latents` splices the SAE in with its error term (so the model's output is unchanged) and, for
every latent active at one position, reports

- ``activations`` ``a_i``;
- ``write_norms`` ``|a_i| * ||W_dec[i]||``, how much it writes;
- ``direct_effects``: its write's effect on the target logit through the final norm *linearised with the cached
  scale*, as TransformerLens's ``ActivationCache.logit_attrs``: ``apply_ln_to_stack(a_i W_dec[i]) * w @ W_U[:, t]``
  (``w`` the final norm's multiplier). Only for SAEs that write into the residual stream (``hook_resid_*``,
  ``hook_attn_out``, ``hook_mlp_out``); NaN elsewhere. Gemma 2's final soft-cap is not linearised;
- ``grad_x_act``: ``a_i * d logit_t / d a_i`` at that position, through the whole model.

:func:`ablate` zeroes SAE latents (at every position, with the error term kept), MLP neurons (``mlp.hook_post``)
or attention heads (``attn.hook_z``) and returns the target's logit and probability and the top next tokens, with
and without.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechscope.models.hooked import HookedModel
from mechscope.models.names import block_hook, parse_hook
from mechscope.models.tokenizer import Input
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.splice import splice_sae

RESIDUAL_WRITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass
class LatentAttribution:
    """The latents active at ``position`` (``[m]`` each, by decreasing activation) and their effects on ``target``'s
    logit there; ``logit`` is that logit (the model's, unchanged by the splice)."""

    position: int
    target: int
    logit: float
    latents: Tensor
    activations: Tensor
    write_norms: Tensor
    direct_effects: Tensor
    grad_x_act: Tensor


def _tokens(model: HookedModel, prompt: Input) -> Tensor:
    tokens = model.to_tokens(prompt) if isinstance(prompt, str | list) else torch.as_tensor(prompt)
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    if tokens.shape[0] != 1:
        raise ValueError(f"one prompt at a time: got a batch of {tokens.shape[0]}")
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] > n_ctx:
        raise ValueError(f"the prompt has {tokens.shape[1]} tokens, more than the model's context n_ctx={n_ctx}")
    return tokens.to(model.device)


def attribute_latents(
    model: HookedModel,
    sae: SparseAutoencoder,
    prompt: Input,
    target: int,
    position: int = -1,
    hook_name: str | None = None,
) -> LatentAttribution:
    """Attribution of ``target``'s logit at ``position`` to the SAE latents active there (module docstring)."""
    tokens = _tokens(model, prompt)
    pos = position % tokens.shape[1]
    leaf: dict[str, Tensor] = {}

    def as_leaf(latents: Tensor, hook) -> Tensor:
        leaf["latents"] = latents.detach().requires_grad_(True)
        return leaf["latents"]

    splice = splice_sae(model, sae, hook_name, include_error=True, latent_hooks=[as_leaf])
    scale: dict[str, Tensor] = {}

    def keep_scale(t: Tensor, hook) -> None:
        scale["final"] = t.detach()

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[*splice, ("ln_final.hook_scale", keep_scale)])
        logit = logits[0, pos, target]
        (grad,) = torch.autograd.grad(logit, leaf["latents"])
    acts = leaf["latents"].detach()[0, pos]
    active = (acts != 0).nonzero()[:, 0]
    active = active[acts[active].abs().argsort(descending=True)]
    a = acts[active]
    W_dec = sae.W_dec.detach()[active].float()  # noqa: N806
    writes = a[:, None].float() * W_dec
    if parse_hook(splice.hook_name).point in RESIDUAL_WRITES:
        if model.cfg.normalization_type == "LN":
            writes = writes - writes.mean(-1, keepdim=True)
        unembed = (model.ln_final_w.detach() * model.W_U.detach()[:, target]).float()  # [d_model]
        direct = (writes / scale["final"][0, pos].float()) @ unembed
    else:
        direct = torch.full_like(a, float("nan"))
    return LatentAttribution(
        position=pos,
        target=target,
        logit=float(logit.detach()),
        latents=active,
        activations=a,
        write_norms=a.abs() * W_dec.norm(dim=-1),
        direct_effects=direct,
        grad_x_act=a * grad[0, pos, active],
    )


@dataclass
class Ablation:
    """The target's logit and probability at the position without (``clean_*``) and with the ablation, and the
    ``top_k`` next tokens (``[top_k]`` ids and probabilities) of each."""

    clean_logit: float
    ablated_logit: float
    clean_prob: float
    ablated_prob: float
    clean_top: tuple[Tensor, Tensor]
    ablated_top: tuple[Tensor, Tensor]


def ablate(
    model: HookedModel,
    prompt: Input,
    target: int,
    position: int = -1,
    *,
    sae: SparseAutoencoder | None = None,
    latents: Iterable[int] = (),
    neurons: Iterable[tuple[int, int]] = (),
    heads: Iterable[tuple[int, int]] = (),
    hook_name: str | None = None,
    top_k: int = 10,
) -> Ablation:
    """Zero ``latents`` of ``sae`` (spliced with its error term), MLP ``neurons`` ``(layer, index)`` and attention
    ``heads`` ``(layer, head)`` at every position, and compare the next-token distribution at ``position``."""
    tokens = _tokens(model, prompt)
    pos = position % tokens.shape[1]
    hooks: list[tuple[str, Callable[[Tensor, Any], Tensor | None]]] = []
    latent_ids = list(latents)
    if latent_ids:
        if sae is None:
            raise ValueError("ablating latents needs the SAE: pass sae=")
        if not all(0 <= i < sae.cfg.d_sae for i in latent_ids):
            raise ValueError(f"latents {latent_ids} must be in 0..{sae.cfg.d_sae - 1}")
        index = torch.tensor(latent_ids, device=sae.W_dec.device)
        splice = splice_sae(
            model, sae, hook_name, include_error=True, latent_hooks=[lambda z, hook: z.index_fill(-1, index, 0.0)]
        )
        hooks.extend(splice)
    by_layer: dict[tuple[str, int], list[int]] = {}
    cfg = model.cfg
    for kind, units, size in (("mlp.hook_post", neurons, cfg.d_mlp), ("attn.hook_z", heads, cfg.n_heads)):
        for layer, unit in units:
            if not (0 <= layer < cfg.n_layers and 0 <= unit < size):
                raise ValueError(
                    f"{kind} unit ({layer}, {unit}) does not exist: layers are 0..{cfg.n_layers - 1}, "
                    f"units 0..{size - 1}"
                )
            by_layer.setdefault((kind, layer), []).append(unit)
    for (kind, layer), indices in by_layer.items():
        hooks.append((block_hook(layer, kind), _zero(kind, indices)))
    with torch.no_grad():
        clean = model(tokens)[0, pos].float()
        ablated = model.run_with_hooks(tokens, fwd_hooks=hooks)[0, pos].float()
    k = min(top_k, clean.shape[-1])
    clean_p, ablated_p = clean.softmax(-1), ablated.softmax(-1)
    return Ablation(
        clean_logit=float(clean[target]),
        ablated_logit=float(ablated[target]),
        clean_prob=float(clean_p[target]),
        ablated_prob=float(ablated_p[target]),
        clean_top=(clean_p.topk(k).indices, clean_p.topk(k).values),
        ablated_top=(ablated_p.topk(k).indices, ablated_p.topk(k).values),
    )


def _zero(kind: str, units: list[int]) -> Callable[[Tensor, Any], Tensor]:
    index = torch.tensor(units)

    def hook(t: Tensor, hook) -> Tensor:  # mlp.hook_post [batch, pos, d_mlp]; attn.hook_z [batch, pos, head, d_head]
        return t.index_fill(-1 if kind == "mlp.hook_post" else 2, index.to(t.device), 0.0)

    return hook
