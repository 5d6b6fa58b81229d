"""Hook points: every name a hook can attach to, and the PyTorch hooks that serve the active ones.

A *site* serves one or more hook names at one place in the HF module tree. :meth:`PointSet.sync`
installs the PyTorch hooks of exactly the sites whose names have a function in the registry, and
removes every one of them on the next sync, so a model with no active hook carries no PyTorch hook.

Canonical names (TransformerLens) per block ``L``::

    blocks.L.hook_resid_pre  blocks.L.ln1.hook_scale  blocks.L.ln1.hook_normalized
    blocks.L.attn.hook_q/k/v/attn_scores/pattern/z  blocks.L.attn.hook_result  blocks.L.hook_attn_out
    blocks.L.hook_resid_mid  blocks.L.ln2.hook_scale  blocks.L.ln2.hook_normalized
    blocks.L.mlp.hook_pre  blocks.L.mlp.hook_pre_linear  blocks.L.mlp.hook_post
    blocks.L.hook_mlp_out  blocks.L.hook_resid_post

and ``hook_embed``, ``hook_pos_embed``, ``ln_final.hook_scale``, ``ln_final.hook_normalized``,
``hook_logits``. Besides these every backbone submodule ``P`` has ``P.hook_result_pre`` (its first
input) and ``P.hook_result_post`` (its output, or the output's first element). The names are built and
parsed by :mod:`mechscope.models.names`, once, when the sites are made and when a name is resolved.
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
from mechscope.models.names import MODULE_POINTS, HookName, block_hook, hook_names, is_per_head, module_hook, parse_hook
from mechscope.models.weights import linear_in_out


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
    """A module's first input (positional or keyword)."""

    def __init__(self, name: str, module: nn.Module):
        self.names, self.module = (name,), module

    def install(self, run, active):
        name = self.names[0]

        def hook(module, args, kwargs):
            value, rebuild = _first_input(args, kwargs)
            new, edited = run(name, value)
            return rebuild(new) if edited else None

        return [self.module.register_forward_pre_hook(hook, with_kwargs=True)]


class NormSite(Site):
    """``hook_scale`` ``[batch, pos, 1]`` and ``hook_normalized`` (before weight and bias) of a norm.

    Read-only hooks leave the module's own output untouched (bitwise); an edit, or a backward hook,
    makes the output be recomputed from the hooked values.
    """

    def __init__(self, scale_name: str, normalized_name: str, module: nn.Module, kind: str):
        self.names = (scale_name, normalized_name)
        self.module, self.kind = module, kind

    def _eps(self) -> float:
        return float(getattr(self.module, "eps", getattr(self.module, "variance_epsilon", 1e-6)))

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

    def install(self, run, active):
        scale_name, norm_name = self.names
        eps = self._eps()

        def hook(module, args, output):
            x = args[0]
            if self.kind == "layer":
                centred = x - x.mean(-1, keepdim=True)
                inv = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
            else:
                centred = x.float()
                inv = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
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
                return self.apply_weight(normalized, x.dtype)
            return None

        return [self.module.register_forward_hook(hook)]


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
            site = AttentionSite(layer, registry)
            attach_site(attn, site)
            self.attn_sites.append(site)
            sites += [
                InputSite(name("hook_resid_pre"), block),
                NormSite(
                    name("ln1.hook_scale"),
                    name("ln1.hook_normalized"),
                    block.get_submodule(adapter.ln1),
                    adapter.norm_kind,
                ),
                ResultSite(name("attn.hook_result"), attn.get_submodule(adapter.o_proj), cfg.n_heads),
                OutputSite(name("hook_attn_out"), block.get_submodule(adapter.attn_out)),
            ]
            if not cfg.parallel_attn_mlp:
                sites.append(ResidMidSite(name("hook_resid_mid"), ln2, block))
            sites.append(NormSite(name("ln2.hook_scale"), name("ln2.hook_normalized"), ln2, adapter.norm_kind))
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
            sites += [
                InputSite(name("mlp.hook_post"), mlp.get_submodule(adapter.mlp_down)),
                OutputSite(name("hook_mlp_out"), block.get_submodule(adapter.mlp_out)),
                OutputSite(name("hook_resid_post"), block),
            ]
        final = bb.get_submodule(adapter.final_norm)
        sites.append(NormSite("ln_final.hook_scale", "ln_final.hook_normalized", final, adapter.norm_kind))
        self.sites = sites
        served = {n for s in sites for n in s.names} | {n for a in self.attn_sites for n in a.names.values()}
        served.add("hook_logits")  # run by HookedModel on the returned logits
        #: the canonical names this model serves, in the order a forward pass reaches them
        self.names: list[str] = [n for n in hook_names(cfg.n_layers) if n in served]
        self._name_set = set(self.names)

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
            return [n for n in self.names if name_or_pred(n)]
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

    def add_stop(self, module: nn.Module, before: bool, exc: type[BaseException]) -> RemovableHandle:
        """A hook that raises ``exc`` before ``module`` runs (ahead of every other pre-hook) or after it
        (behind every other forward hook); also removed by :meth:`remove_all`."""

        def stop(*_):
            raise exc

        handle = module.register_forward_pre_hook(stop, prepend=True) if before else module.register_forward_hook(stop)
        self._handles.append(handle)
        return handle
