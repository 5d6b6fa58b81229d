"""Hook points: every name a hook can attach to, and the PyTorch hooks that serve the active ones.

A *site* serves one or more hook names at one place in the HF module tree. :meth:`PointSet.sync`
installs the PyTorch hooks of exactly the sites whose names have a function in the registry, and
removes every one of them on the next sync, so a model with no active hook carries no PyTorch hook.

Canonical names (TransformerLens) per block ``L``::

    blocks.L.hook_resid_pre  [blocks.L.hook_attn_in  blocks.L.hook_q/k/v_input]  blocks.L.ln1.hook_scale/normalized
    blocks.L.attn.hook_q/k/v  blocks.L.attn.hook_rot_q/rot_k  blocks.L.attn.hook_attn_scores/pattern/z
    blocks.L.attn.hook_result  [blocks.L.ln1_post.hook_scale/normalized]  blocks.L.hook_attn_out
    blocks.L.hook_resid_mid  [blocks.L.hook_mlp_in]  blocks.L.ln2.hook_scale  blocks.L.ln2.hook_normalized
    blocks.L.mlp.hook_pre  blocks.L.mlp.hook_pre_linear  blocks.L.mlp.hook_post
    [blocks.L.ln2_post.hook_scale/normalized]  blocks.L.hook_mlp_out  blocks.L.hook_resid_post

(bracketed: only with a model option, or only in some families) and ``hook_embed``, ``hook_pos_embed``,
``ln_final.hook_scale``, ``ln_final.hook_normalized``, ``unembed.hook_in``, ``unembed.hook_out``, ``hook_logits``.
Besides these every backbone submodule ``P`` has ``P.hook_result_pre`` (its first input) and ``P.hook_result_post``
(its output, or the output's first element). The names are built and parsed by :mod:`mechscope.models.names`, once,
when the sites are made and when a name is resolved.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mechscope.models.adapters import Adapter
from mechscope.models.attention import AttentionSite, attach_site
from mechscope.models.config import HookedConfig
from mechscope.models.hooks import HookRegistry
from mechscope.models.names import (
    ATTN_POINTS,
    MODULE_POINTS,
    OPT_IN_POINTS,
    ROTARY_POINTS,
    HookName,
    block_hook,
    hook_names,
    is_per_head,
    module_hook,
    parse_hook,
)
from mechscope.models.weights import linear_in_out, merge_qkv, qkv_in_out, qkv_projections, split_qkv


def token_vectors(activation: torch.Tensor, hook_name: str) -> torch.Tensor:
    """One vector per token: ``[..., head, d]`` -> ``[..., head * d]`` at a per-head point (``attn.hook_z`` ...),
    the activation unchanged elsewhere. This is how SAEs and activation stores read per-head points (the SAELens
    convention: an ``attn.hook_z`` SAE has ``d_in = n_heads * d_head``, heads outer); ``.view(activation.shape)``
    undoes it."""
    return activation.flatten(-2) if is_per_head(hook_name) else activation


def _first_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable]:
    """The first tensor input of a call and a function that rebuilds (args, kwargs) with it replaced."""
    if args:
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    key = (
        "hidden_states"
        if "hidden_states" in kwargs
        else next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    )
    return kwargs[key], lambda t: (args, {**kwargs, key: t})


def _split_output(output) -> tuple[torch.Tensor, Callable]:
    if isinstance(output, tuple):
        return output[0], lambda t: (t, *output[1:])
    return output, lambda t: t


class Site(ABC):
    """One place in the module tree serving some hook names."""

    names: tuple[str, ...]

    @abstractmethod
    def install(self, run: HookRegistry, active: set[str]) -> list[RemovableHandle]:
        """Register the PyTorch hooks that run the active names of this site; return their handles."""


class OutputSite(Site):
    """A module's output (first element of a tuple output)."""

    def __init__(self, name: str, module: nn.Module):
        self.names, self.module = (name,), module

    def install(self, run, active):
        name = self.names[0]

        def hook(module, args, output):
            value, rebuild = _split_output(output)
            new, edited = run(name, value)
            return rebuild(new) if edited else None

        return [self.module.register_forward_hook(hook)]


class PosEmbedSite(Site):
    """``hook_pos_embed`` ``[batch, pos, d_model]``: learned position embeddings, expanded to the batch.

    HF computes them once for the batch (``[1, pos, d_model]``); the token embedding, which runs just
    before, tells the batch size.
    """

    def __init__(self, name: str, module: nn.Module, token_embed: nn.Module):
        self.names, self.module, self.token_embed = (name,), module, token_embed

    def install(self, run, active):
        batch: list[int] = []

        def record(module, args, output):
            batch[:] = [output.shape[0]]

        def hook(module, args, output):
            expanded = output.expand(batch[0] if batch else output.shape[0], -1, -1).contiguous()
            return run(self.names[0], expanded)[0]

        return [self.token_embed.register_forward_hook(record), self.module.register_forward_hook(hook)]


class InputSite(Site):
    """A module's first input (positional or keyword).

    With ``own_copy`` the hooks see a copy, so that an in-place edit changes this module's input only and not the
    tensor the caller goes on using (``hook_mlp_in``: the MLP's input, not the residual stream).
    """

    def __init__(self, name: str, module: nn.Module, own_copy: bool = False):
        self.names, self.module, self.own_copy = (name,), module, own_copy

    def install(self, run, active):
        name = self.names[0]

        def hook(module, args, kwargs):
            value, rebuild = _first_input(args, kwargs)
            new, edited = run(name, value.clone() if self.own_copy else value)
            return rebuild(new) if edited or (self.own_copy and run.has_bwd(name)) else None

        return [self.module.register_forward_pre_hook(hook, with_kwargs=True)]


class Norm:
    """The arithmetic of one LayerNorm / RMSNorm module, written out so hooks can split it and rerun it."""

    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind = module, kind

    @property
    def eps(self) -> float:
        return float(getattr(self.module, "eps", getattr(self.module, "variance_epsilon", 1e-6)))

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centred, 1 / scale)`` over the last dimension: ``x`` minus its mean (LayerNorm) or ``x`` in float32
        (RMSNorm), and the inverse of ``hook_scale``."""
        centred = x - x.mean(-1, keepdim=True) if self.kind == "layer" else x.float()
        return centred, torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)

    def apply_weight(self, normalized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight: torch.Tensor | None = getattr(self.module, "weight", None)
        bias: torch.Tensor | None = getattr(self.module, "bias", None)
        if self.kind == "layer":
            out = normalized.to(dtype)
            if weight is not None:
                out = out * weight
            return out + bias if bias is not None else out
        if weight is None:
            raise ValueError(f"the {self.kind} norm {type(self.module).__name__} has no weight")
        if self.kind == "rms_offset":
            return (normalized * (1.0 + weight.float())).to(dtype)
        return weight * normalized.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's output on ``[..., d_model]`` without calling the module (so its hooks do not fire)."""
        centred, inv = self.parts(x)
        return self.apply_weight(centred * inv, x.dtype)


class NormSite(Site):
    """``hook_scale`` ``[batch, pos, 1]`` and ``hook_normalized`` (before weight and bias) of a norm.

    Read-only hooks leave the module's own output untouched (bitwise); an edit, or a backward hook,
    makes the output be recomputed from the hooked values.
    """

    def __init__(self, scale_name: str, normalized_name: str, module: nn.Module, kind: str):
        self.names = (scale_name, normalized_name)
        self.module, self.norm = module, Norm(module, kind)

    def install(self, run, active):
        scale_name, norm_name = self.names

        def hook(module, args, output):
            x = args[0]
            centred, inv = self.norm.parts(x)
            edited = False
            if scale_name in active:
                scale, edited = run(scale_name, 1.0 / inv)
                if edited or run.has_bwd(scale_name):
                    inv = 1.0 / scale
            normalized = centred * inv
            if norm_name in active:
                normalized, e = run(norm_name, normalized)
                edited = edited or e
            if edited or run.has_bwd(scale_name) or run.has_bwd(norm_name):
                return self.norm.apply_weight(normalized, x.dtype)
            return None

        return [self.module.register_forward_hook(hook)]


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., d]`` -> ``[..., heads, d]``, one copy per head (TransformerLens's ``repeat_along_head_dimension``)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], heads, x.shape[-1]).clone()


class AttnInputSite(Site):
    """Everything between the residual stream and the attention function of one block.

    ``hook_attn_in`` ``[batch, pos, n_heads, d_model]`` and ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input``
    (``[..., n_heads | n_key_value_heads, d_model]``): the block's input (``hook_resid_pre``) once per head, read at
    the input of ln1, as TransformerLens's opt-in ``use_attn_in`` / ``use_split_qkv_input``. An edit there makes
    that head's q, k or v be recomputed from the edited input, through ln1's weights (without firing ln1's hooks)
    and the head's projection; with ``use_split_qkv_input`` on, q, k and v come from the split inputs and
    ``hook_attn_in`` edits do not reach them (as in TransformerLens).

    ``attn.hook_q`` ``[batch, pos, n_heads, d_head]``, ``hook_k`` / ``hook_v`` ``[batch, pos, n_key_value_heads,
    d_head]``: the projections' outputs per head, before Qwen 3's q/k-norm and before rotary (TransformerLens's
    meaning; ``attn.hook_rot_q`` / ``hook_rot_k`` hold them after rotary). They cover the positions of this forward
    pass only, not those in a kv cache.
    """

    def __init__(self, layer: int, ln1: nn.Module, norm_kind: str, attn: nn.Module, cfg: Callable[[], HookedConfig]):
        self.inputs = tuple(block_hook(layer, p) for p in ("hook_q_input", "hook_k_input", "hook_v_input"))
        self.attn_in = block_hook(layer, "hook_attn_in")
        self.outputs = tuple(block_hook(layer, p) for p in ("attn.hook_q", "attn.hook_k", "attn.hook_v"))
        self.names = (self.attn_in, *self.inputs, *self.outputs)
        self.ln1, self.norm, self.attn, self.cfg = ln1, Norm(ln1, norm_kind), attn, cfg

    def _heads(self, part: int) -> int:
        c = self.cfg()
        return c.n_heads if part == 0 else c.n_key_value_heads

    def _project(self, part: int, per_head_input: torch.Tensor) -> torch.Tensor:
        """q (``part`` 0), k (1) or v (2) ``[..., heads, d_head]`` of per-head inputs ``[..., heads, d_model]``."""
        weight, bias = qkv_in_out(self.attn, self.cfg())[part]  # [d_model, heads * d_head], [heads * d_head]
        heads = self._heads(part)
        w = weight.unflatten(-1, (heads, -1))  # [d_model, heads, d_head]
        return torch.einsum("...hm,mhd->...hd", self.norm(per_head_input), w) + bias.unflatten(-1, (heads, -1))

    def install(self, run, active):
        handles: list[RemovableHandle] = []
        pending: dict[int, torch.Tensor] = {}  # part -> its edited per-head input, for this forward pass
        split = self.cfg().use_split_qkv_input

        def inputs(module, args, kwargs):
            x, _ = _first_input(args, kwargs)
            pending.clear()
            if self.attn_in in active:
                value, e = run(self.attn_in, _per_head(x, self.cfg().n_heads))
                if (e or run.has_bwd(self.attn_in)) and not split:
                    pending.update({0: value, 1: value, 2: value})
            for part, name in enumerate(self.inputs):
                if name in active:
                    value, e = run(name, _per_head(x, self._heads(part)))
                    if e or run.has_bwd(name):
                        pending[part] = value
            return None

        if active.intersection((self.attn_in, *self.inputs)):
            handles.append(self.ln1.register_forward_pre_hook(inputs, with_kwargs=True))

        def part_output(part: int, flat: torch.Tensor) -> tuple[torch.Tensor, bool]:
            value = flat.unflatten(-1, (self._heads(part), -1))
            edited = part in pending
            if edited:
                value = self._project(part, pending.pop(part)).to(flat.dtype)
            name = self.outputs[part]
            if name in active:
                value, e = run(name, value)
                edited = edited or e or run.has_bwd(name)
            return value.flatten(-2), edited

        modules, layout = qkv_projections(self.attn)
        if layout is None:
            for part, module in enumerate(modules):

                def separate(module, args, output, part=part):
                    new, edited = part_output(part, output)
                    return new if edited else None

                handles.append(module.register_forward_hook(separate))
        else:

            def fused(module, args, output):
                parts = [part_output(i, t) for i, t in enumerate(split_qkv(output, layout, self.cfg()))]
                if not any(edited for _, edited in parts):
                    return None
                return merge_qkv(*(value for value, _ in parts), layout, self.cfg())

            handles.append(modules[0].register_forward_hook(fused))
        return handles


class FusedGateSite(Site):
    """``mlp.hook_pre`` / ``mlp.hook_pre_linear`` of a fused gate-up projection (gate first, then up)."""

    def __init__(self, pre_name: str, pre_linear_name: str, module: nn.Module):
        self.names = (pre_name, pre_linear_name)
        self.module = module

    def install(self, run, active):
        def hook(module, args, output):
            parts, edited = list(output.chunk(2, dim=-1)), False
            for i, name in enumerate(self.names):
                if name in active:
                    parts[i], e = run(name, parts[i])
                    edited = edited or e or run.has_bwd(name)
            return torch.cat(parts, dim=-1) if edited else None

        return [self.module.register_forward_hook(hook)]


class ResultSite(Site):
    """``attn.hook_result`` ``[batch, pos, head, d_model]``: each head's output through o_proj, no bias."""

    def __init__(self, name: str, o_proj: nn.Module, n_heads: int):
        self.names, self.module, self.n_heads = (name,), o_proj, n_heads

    def install(self, run, active):
        name = self.names[0]

        def hook(module, args, output):
            weight, bias = linear_in_out(module)  # [n_heads * d_head, d_model], [d_model]
            z = args[0].reshape(*args[0].shape[:-1], self.n_heads, -1)
            per_head = weight.reshape(self.n_heads, -1, weight.shape[-1])
            result, edited = run(name, torch.einsum("...hd,hdm->...hm", z, per_head))
            if edited or run.has_bwd(name):
                return result.sum(-2) + bias
            return None

        return [self.module.register_forward_hook(hook)]


class ResidMidSite(Site):
    """``hook_resid_mid``: the residual after attention, read at the input of ln2.

    An edit replaces ln2's input and adds the same difference to the block's output, so the residual
    stream carries the edited value on.
    """

    def __init__(self, name: str, ln2: nn.Module, block: nn.Module):
        self.names, self.ln2, self.block = (name,), ln2, block

    def install(self, run, active):
        name, pending = self.names[0], []

        def pre(module, args, kwargs):
            value, rebuild = _first_input(args, kwargs)
            new, edited = run(name, value)
            if edited:
                pending.append(new - value if new is not value else None)
                return rebuild(new)
            return None

        def post(module, args, output):
            delta = pending.pop() if pending else None
            if delta is None:
                return None
            value, rebuild = _split_output(output)
            return rebuild(value + delta)

        return [
            self.ln2.register_forward_pre_hook(pre, with_kwargs=True),
            self.block.register_forward_hook(post),
        ]


class PointSet:
    """The hook points of one wrapped model and the PyTorch hooks currently serving them."""

    def __init__(self, hf_model: nn.Module, adapter: Adapter, cfg: HookedConfig, registry: HookRegistry):
        self.registry, self.cfg, self.adapter = registry, cfg, adapter
        self.backbone = hf_model.get_submodule(adapter.backbone)
        self._handles: list[RemovableHandle] = []
        self.attn_sites: list[AttentionSite] = []
        sites: list[Site] = []
        bb = self.backbone
        embed = bb.get_submodule(adapter.embed)
        sites.append(OutputSite("hook_embed", embed))
        if adapter.pos_embed:
            sites.append(PosEmbedSite("hook_pos_embed", bb.get_submodule(adapter.pos_embed), embed))
        for layer in range(cfg.n_layers):
            name = partial(block_hook, layer)  # name("hook_resid_pre") == "blocks.{layer}.hook_resid_pre"
            block = adapter.block(bb, layer)
            attn = block.get_submodule(adapter.attn)
            mlp = block.get_submodule(adapter.mlp)
            ln2 = block.get_submodule(adapter.ln2)
            ln1 = block.get_submodule(adapter.ln1)
            rotary = cfg.positional_embedding_type == "rotary"
            site = AttentionSite(layer, registry, tuple(p for p in ATTN_POINTS if rotary or p not in ROTARY_POINTS))
            attach_site(attn, site)
            self.attn_sites.append(site)
            sites += [
                InputSite(name("hook_resid_pre"), block),
                AttnInputSite(layer, ln1, adapter.norm_kind, attn, lambda: self.cfg),
                NormSite(name("ln1.hook_scale"), name("ln1.hook_normalized"), ln1, adapter.norm_kind),
                ResultSite(name("attn.hook_result"), attn.get_submodule(adapter.o_proj), cfg.n_heads),
            ]
            attn_out = block.get_submodule(adapter.attn_out)
            if adapter.post_norms:
                sites.append(
                    NormSite(name("ln1_post.hook_scale"), name("ln1_post.hook_normalized"), attn_out, adapter.norm_kind)
                )
            sites.append(OutputSite(name("hook_attn_out"), attn_out))
            if not cfg.parallel_attn_mlp:
                sites.append(ResidMidSite(name("hook_resid_mid"), ln2, block))
            sites += [
                InputSite(name("hook_mlp_in"), ln2, own_copy=True),
                NormSite(name("ln2.hook_scale"), name("ln2.hook_normalized"), ln2, adapter.norm_kind),
            ]
            if adapter.mlp_kind == "fused_gated":
                sites.append(
                    FusedGateSite(name("mlp.hook_pre"), name("mlp.hook_pre_linear"), mlp.get_submodule(adapter.mlp_in))
                )
            else:
                sites.append(OutputSite(name("mlp.hook_pre"), mlp.get_submodule(adapter.mlp_in)))
            if adapter.mlp_kind == "gated":
                if adapter.mlp_up is None:
                    raise ValueError(f"the {adapter.family} adapter has a gated MLP but no mlp_up path")
                sites.append(OutputSite(name("mlp.hook_pre_linear"), mlp.get_submodule(adapter.mlp_up)))
            sites.append(InputSite(name("mlp.hook_post"), mlp.get_submodule(adapter.mlp_down)))
            mlp_out = block.get_submodule(adapter.mlp_out)
            if adapter.post_norms:
                sites.append(
                    NormSite(name("ln2_post.hook_scale"), name("ln2_post.hook_normalized"), mlp_out, adapter.norm_kind)
                )
            sites += [OutputSite(name("hook_mlp_out"), mlp_out), OutputSite(name("hook_resid_post"), block)]
        final = bb.get_submodule(adapter.final_norm)
        lm_head = hf_model.get_submodule(adapter.lm_head)
        sites += [
            NormSite("ln_final.hook_scale", "ln_final.hook_normalized", final, adapter.norm_kind),
            InputSite("unembed.hook_in", lm_head),
            OutputSite("unembed.hook_out", lm_head),
        ]
        self.sites = sites
        served = {n for s in sites for n in s.names} | {n for a in self.attn_sites for n in a.names.values()}
        served.add("hook_logits")  # run by HookedModel on the returned logits
        self._served = [n for n in hook_names(cfg.n_layers) if n in served]
        self._served_set = set(self._served)
        self.refresh()

    def refresh(self) -> None:
        """Recompute :attr:`names` after :attr:`cfg` changed (an opt-in flag), and reinstall the hooks."""
        off = {p for flag, points in OPT_IN_POINTS.items() if not getattr(self.cfg, flag) for p in points}
        #: the canonical names this model serves, in the order a forward pass reaches them (opt-in points only
        #: when their flag is on)
        self.names: list[str] = [n for n in self._served if parse_hook(n).point not in off]
        self._name_set = set(self.names)
        self.sync()

    # ---- names -------------------------------------------------------------------------------
    def generic_names(self) -> list[str]:
        return [module_hook(n, which) for n, _ in self.backbone.named_modules() if n for which in MODULE_POINTS]

    def _module_of(self, parsed: HookName) -> nn.Module | None:
        if parsed.module is None or parsed.sae is not None:
            return None
        try:
            return self.backbone.get_submodule(parsed.module)
        except AttributeError:
            return None

    def _generic_site(self, name: str) -> Site | None:
        try:
            parsed = parse_hook(name)
        except ValueError:
            return None
        module = self._module_of(parsed)
        if module is None:
            return None
        return InputSite(name, module) if parsed.point == MODULE_POINTS["pre"] else OutputSite(name, module)

    def resolve(self, name_or_pred: str | Callable[[str], bool]) -> list[str]:
        """The hook names a name or a predicate selects; a clear error for unknown names.

        A predicate is tested against the canonical names (generic module points are selected by name).
        """
        if callable(name_or_pred):
            names = [n for n in self.names if name_or_pred(n)]
            if not names:
                label = getattr(name_or_pred, "__name__", repr(name_or_pred))
                examples = ", ".join(self.names[i] for i in sorted({0, 1, len(self.names) // 2, len(self.names) - 1}))
                raise ValueError(
                    f"the hook predicate {label!r} matches no hook point of this model (names look like {examples}); "
                    "fix the predicate (see model.hook_names() for every name; opt-in points need their option on)"
                )
            return names
        name = name_or_pred
        if not isinstance(name, str):
            raise TypeError(f"a hook point is a name or a predicate on names, got {type(name).__name__}")
        if name in self._name_set or self._generic_site(name) is not None:
            return [name]
        try:
            layer = parse_hook(name).layer
        except ValueError:
            layer = None
        if layer is not None and not 0 <= layer < self.cfg.n_layers:
            raise ValueError(
                f"hook point {name!r}: layer {layer} is out of range; this model has "
                f"{self.cfg.n_layers} layers, valid layers are 0..{self.cfg.n_layers - 1}"
            )
        if name in self._served_set:
            flag = next(f for f, points in OPT_IN_POINTS.items() if parse_hook(name).point in points)
            raise KeyError(
                f"hook point {name!r} exists only with the option {flag} (off by default, as in TransformerLens): "
                f"HookedModel(..., {flag}=True) or model.set_{flag}(True)"
            )
        close = difflib.get_close_matches(name, self.names + self.generic_names(), n=5, cutoff=0.5)
        hint = f" Closest valid names: {', '.join(close)}." if close else ""
        raise KeyError(f"unknown hook point {name!r}.{hint} See model.hook_names() for every name.")

    def module_shape(self, name: str) -> tuple[int, ...]:
        """One position's shape at a module point, from the module (no forward pass): the input or output width
        of a linear layer or an embedding, ``(d_model,)`` at modules that read and write the residual stream."""
        parsed = parse_hook(name)
        module = self._module_of(parsed)
        if module is None:
            raise ValueError(f"{name!r} is not a module point of this model: see model.hook_names(True)")
        pre = parsed.point == MODULE_POINTS["pre"]
        if isinstance(module, nn.Embedding) and not pre:  # (its input is ids, token or position)
            return (module.embedding_dim,)
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            weight, _ = linear_in_out(module)  # [in, out]
            return (int(weight.shape[0 if pre else 1]),)
        if any(module is m for m in self._residual_modules()):
            return (self.cfg.d_model,)
        raise ValueError(
            f"mechscope cannot tell the shape at {name!r} ({type(module).__name__}) without running the model; "
            "read it off model.run_with_cache(tokens, names_filter=name)"
        )

    def _residual_modules(self) -> list[nn.Module]:
        """The modules whose first input and output are ``[..., d_model]``: each block, its norms, attention and
        MLP, and the final norm."""
        a = self.adapter
        parts = (a.ln1, a.ln2, a.attn, a.attn_out, a.mlp, a.mlp_out)
        stack = self.adapter.blocks(self.backbone)
        out = [self.backbone.get_submodule(a.final_norm)]
        for block in stack.children():
            out += [block, *(block.get_submodule(p) for p in parts)]
        return out

    # ---- installing ----------------------------------------------------------------------------
    def sync(self) -> None:
        """Remove every PyTorch hook, then install those the registry's active names need."""
        self.remove_all()
        active = self.registry.active_names()
        for attn_site in self.attn_sites:
            attn_site.refresh()
        if not active:
            return
        for site in self.sites:
            if active.intersection(site.names):
                self._handles += site.install(self.registry, active)
        for name in sorted(active - self._name_set):
            generic = self._generic_site(name)
            if generic is not None:
                self._handles += generic.install(self.registry, active)

    def remove_all(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for attn_site in self.attn_sites:
            attn_site.active = frozenset()

    def add_stop(
        self, module: nn.Module, before: bool, exc: Callable[[torch.Tensor], BaseException]
    ) -> RemovableHandle:
        """A hook that raises ``exc(value)`` with ``module``'s first input, before it runs (ahead of every other
        pre-hook), or with its output, after it (behind every other forward hook); also removed by
        :meth:`remove_all`."""

        def stop_before(module, args, kwargs):
            raise exc(_first_input(args, kwargs)[0])

        def stop_after(module, args, output):
            raise exc(_split_output(output)[0])

        if before:
            handle = module.register_forward_pre_hook(stop_before, prepend=True, with_kwargs=True)
        else:
            handle = module.register_forward_hook(stop_after)
        self._handles.append(handle)
        return handle
