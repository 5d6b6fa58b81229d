"""Transformer Debugger's hook tree: ``TransformerHooks`` and its parts, ``AtLayers``, ``AutoencoderHooks``.

A hook is ``fn(xx, *args, layer=..., **kwargs) -> tensor``: it receives the activation in Transformer
Debugger's layout (see ``docs/tdb.md``), may edit it in place, and returns the value that carries on. Hooks
at one location run in the order they were appended: every forward hook (``append_fwd``), then the
gradient hooks (``append_bwd``, which see the gradient of the value the forward hooks produced), then
``append_fwd2`` hooks. :class:`mechscope.compat.tdb.Transformer` maps each location onto a mechscope hook point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any, ClassVar

import torch

Hook = Callable[..., torch.Tensor]


class Hooks:
    """A callable sequence of hooks: ``hooks(x, **kwargs)`` threads ``x`` through each in turn."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []
        self.bound_kwargs: dict[str, Any] = {}

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for hook in self._hooks:
            x = hook(x, *args, **kwargs, **self.bound_kwargs)
        return x

    def append(self, hook: Hook) -> Hooks:
        """Add ``hook`` after the existing ones; returns ``self`` so appends chain."""
        self._hooks.append(hook)
        return self

    def bind(self, **kwargs: Any) -> Hooks:
        """Pass ``kwargs`` to every hook on every call (a key may be bound once)."""
        for key, value in kwargs.items():
            if key in self.bound_kwargs:
                raise ValueError(f"keyword {key!r} is already bound")
            self.bound_kwargs[key] = value
        return self

    def unbind(self, keys: list[str]) -> Hooks:
        for key in keys:
            del self.bound_kwargs[key]
        return self

    def is_empty(self) -> bool:
        return not self._hooks

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._hooks)} hooks)"


class _GradHooks(Hooks):
    """Gradient hooks: each appended ``fn(grad, **kwargs) -> grad`` runs on the backward pass.

    As in Transformer Debugger, where each is an identity function of its own applied in append order, the
    backward pass reaches them in reverse: the last appended sees the incoming gradient first and each passes
    its result on to the one appended before it.
    """

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._hooks or not x.requires_grad:
            return x
        hooks, extra = list(self._hooks), {**kwargs, **self.bound_kwargs}

        def run(grad: torch.Tensor) -> torch.Tensor:
            for hook in reversed(hooks):
                grad = hook(grad, *args, **extra)
            return grad

        out = x.view_as(x)  # a new node, so the gradient hook sees exactly this location's gradient
        out.register_hook(run)
        return out


class HookCollection:
    """A named tree of hook locations; attribute access reaches children (``hooks.resid.torso.post_mlp``)."""

    def __init__(self) -> None:
        self.all_hooks: dict[str, HookCollection | Hooks] = {}

    def add_subhooks(self, name: str, subhooks: HookCollection | Hooks) -> HookCollection:
        self.all_hooks[name] = subhooks
        return self

    def __getattr__(self, name: str) -> HookCollection | Hooks:
        hooks = self.__dict__.get("all_hooks", {})
        if name in hooks:
            return hooks[name]
        raise AttributeError(f"{type(self).__name__} has no location {name!r}; locations: {', '.join(hooks)}")

    def bind(self, **kwargs: Any) -> HookCollection:
        for hooks in self.all_hooks.values():
            hooks.bind(**kwargs)
        return self

    def unbind(self, keys: list[str]) -> HookCollection:
        for hooks in self.all_hooks.values():
            hooks.unbind(keys)
        return self

    def append_all(self, hook: Hook) -> HookCollection:
        """Append ``hook`` to every leaf below this node."""
        for hooks in self.all_hooks.values():
            if isinstance(hooks, HookCollection):
                hooks.append_all(hook)
            else:
                hooks.append(hook)
        return self

    def append_to_path(self, path: str, hook: Hook) -> HookCollection:
        """Append to a dotted location, e.g. ``append_to_path("resid.torso.post_mlp.fwd", hook)``."""
        head, _, rest = path.partition(".")
        if head not in self.all_hooks:
            raise KeyError(
                f"no hook location {head!r} in {type(self).__name__}; locations: {', '.join(self.all_hooks)}"
            )
        child = self.all_hooks[head]
        if rest:
            if not isinstance(child, HookCollection):
                raise KeyError(f"{head!r} is a leaf; cannot descend into {rest!r}")
            child.append_to_path(rest, hook)
        elif isinstance(child, Hooks | FwdBwdHooks):
            child.append(hook)
        else:
            raise KeyError(f"{head!r} holds the locations {', '.join(child.all_hooks)}; append to one of them")
        return self

    def is_empty(self) -> bool:
        return all(hooks.is_empty() for hooks in self.all_hooks.values())

    def __deepcopy__(self, memo: dict[int, Any]) -> HookCollection:
        """A copy with copies of every location's hook lists, as Transformer Debugger's (which copies the whole
        tree once per layer before binding ``layer``); the hook functions themselves are shared."""
        new = type(self)()
        new.all_hooks = deepcopy(self.all_hooks, memo)
        return new

    def locations(self, prefix: str = "") -> Iterator[tuple[str, FwdBwdHooks]]:
        """Every ``(dotted path, FwdBwdHooks)`` leaf location below this node, in tree order."""
        for name, hooks in self.all_hooks.items():
            if isinstance(hooks, FwdBwdHooks):
                yield prefix + name, hooks
            elif isinstance(hooks, HookCollection):
                yield from hooks.locations(prefix + name + ".")

    def __repr__(self) -> str:
        active = [path for path, hooks in self.locations() if not hooks.is_empty()]
        return f"{type(self).__name__}(active={active})"


class FwdBwdHooks(HookCollection):
    """One location: ``fwd`` hooks, then ``bwd`` gradient hooks, then ``fwd2`` hooks."""

    _STAGES = ("fwd", "bwd", "fwd2")

    def __init__(self) -> None:
        super().__init__()
        self.add_subhooks("fwd", Hooks())
        self.add_subhooks("bwd", _GradHooks())
        self.add_subhooks("fwd2", Hooks())

    def _stage(self, name: str) -> Hooks:
        hooks = self.all_hooks[name]
        assert isinstance(hooks, Hooks)
        return hooks

    def append_fwd(self, hook: Hook) -> FwdBwdHooks:
        self._stage("fwd").append(hook)
        return self

    def append_bwd(self, hook: Hook) -> FwdBwdHooks:
        self._stage("bwd").append(hook)
        return self

    def append_fwd2(self, hook: Hook) -> FwdBwdHooks:
        self._stage("fwd2").append(hook)
        return self

    def append(self, hook: Hook) -> FwdBwdHooks:
        """As Transformer Debugger's collections: appending to a location appends a forward hook."""
        return self.append_fwd(hook)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for name in self._STAGES:
            x = self._stage(name)(x, *args, **kwargs)
        return x


#: the children of a node of the tree: name -> what builds it
_Children = dict[str, Callable[[], HookCollection | Hooks]]


class _Tree(HookCollection):
    """A HookCollection whose constructor adds the children its class lists in ``_children``."""

    _children: ClassVar[_Children] = {}

    def __init__(self) -> None:
        super().__init__()
        for name, make in self._children.items():
            self.add_subhooks(name, make())


class MLPHooks(_Tree):
    """``pre_act`` ``[batch, pos, d_mlp]`` (input of the activation function), ``post_act`` (its output)."""

    _children: ClassVar[_Children] = {"pre_act": FwdBwdHooks, "post_act": FwdBwdHooks}


class NormalizationHooks(_Tree):
    """A norm's ``post_mean_subtraction`` ``[batch, pos, d_model]``, ``scale`` ``[batch, pos, 1]``, ``post_scale``."""

    _children: ClassVar[_Children] = {
        "post_mean_subtraction": FwdBwdHooks,
        "scale": FwdBwdHooks,
        "post_scale": FwdBwdHooks,
    }


class AttentionHooks(_Tree):
    """``q``/``k``/``v``/``v_out`` ``[batch, pos, head, d_head]``; ``qk_logits``/``qk_probs``
    ``[batch, query_pos, key_pos, head]``."""

    _children: ClassVar[_Children] = {
        "q": FwdBwdHooks,
        "k": FwdBwdHooks,
        "v": FwdBwdHooks,
        "qk_logits": FwdBwdHooks,
        "qk_softmax_denominator": FwdBwdHooks,
        "qk_probs": FwdBwdHooks,
        "v_out": FwdBwdHooks,
    }


class ResidualStreamTorsoHooks(_Tree):
    """The residual stream inside each block, every tensor ``[batch, pos, d_model]`` (norm scales ``[.., 1]``)."""

    _children: ClassVar[_Children] = {
        "post_ln_attn": FwdBwdHooks,
        "ln_attn": NormalizationHooks,
        "delta_attn": FwdBwdHooks,
        "post_attn": FwdBwdHooks,
        "ln_mlp": NormalizationHooks,
        "post_ln_mlp": FwdBwdHooks,
        "delta_mlp": FwdBwdHooks,
        "post_mlp": FwdBwdHooks,
    }


class ResidualStreamHooks(_Tree):
    """``post_emb``, the per-block ``torso``, the final norm ``ln_f`` and its output ``post_ln_f``."""

    _children: ClassVar[_Children] = {
        "post_emb": FwdBwdHooks,
        "torso": ResidualStreamTorsoHooks,
        "ln_f": NormalizationHooks,
        "post_ln_f": FwdBwdHooks,
    }


class TransformerHooks(_Tree):
    """The full location tree of a forward pass; see ``docs/tdb.md`` for shapes and mechscope hook points."""

    _children: ClassVar[_Children] = {
        "mlp": MLPHooks,
        "attn": AttentionHooks,
        "resid": ResidualStreamHooks,
        "logits": FwdBwdHooks,
    }


class ConditionalHooks(Hooks):
    """Hooks that run only when ``condition(x, *args, **kwargs)`` is true."""

    def __init__(self, condition: Callable[..., bool]) -> None:
        super().__init__()
        self.condition = condition

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.condition(x, *args, **kwargs):
            return super().__call__(x, *args, **kwargs)
        return x


class AtLayers(ConditionalHooks):
    """Hooks that run only at the given layer(s): ``AtLayers([3, 5]).append(fn)``."""

    def __init__(self, at_layers: int | list[int]) -> None:
        layers = [at_layers] if isinstance(at_layers, int) else list(at_layers)
        self.at_layers = layers

        def at_layers_condition(x: torch.Tensor, *args: Any, layer: int | None = None, **kwargs: Any) -> bool:
            if layer is None:
                raise TypeError(
                    f"AtLayers({layers}) ran where no layer is passed: append it at a per-layer location "
                    "(mlp.*, attn.*, resid.torso.*), not at resid.post_emb, resid.ln_f.*, resid.post_ln_f or logits"
                )
            return layer in layers

        super().__init__(at_layers_condition)

    def __repr__(self) -> str:
        return f"AtLayers({self.at_layers}, {len(self._hooks)} hooks)"


class AutoencoderHooks(HookCollection):
    """Replace an activation by its autoencoder reconstruction, with hooks on ``latents``,
    ``reconstruction`` and ``error``.

    ``encode(x [..., d_in]) -> latents [..., n_latents]``, ``decode(latents) -> [..., d_in]``. The
    ``error`` hooks see ``x - reconstruction``; with ``add_error=True`` the error of the *unhooked*
    latents is added back, so with no edits the activation is unchanged and an edit to the latents
    changes it by exactly the decoded difference.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable, add_error: bool = False):
        super().__init__()
        for name in ("latents", "reconstruction", "error"):
            self.add_subhooks(name, FwdBwdHooks())
        self.encode, self.decode, self.add_error = encode, decode, add_error

    def __deepcopy__(self, memo: dict[int, Any]) -> AutoencoderHooks:
        """Copies of the hook lists around the *same* ``encode`` and ``decode`` (as Transformer Debugger's), so the
        per-layer copies of a forward pass train and read the one autoencoder."""
        new = type(self)(self.encode, self.decode, self.add_error)
        new.all_hooks = deepcopy(self.all_hooks, memo)
        return new

    def _part(self, name: str) -> FwdBwdHooks:
        hooks = self.all_hooks[name]
        assert isinstance(hooks, FwdBwdHooks)
        return hooks

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        latents = self.encode(x)
        hooked = self._part("latents")(latents.clone() if self.add_error else latents, *args, **kwargs)
        reconstruction = self._part("reconstruction")(self.decode(hooked), *args, **kwargs)
        if self.add_error:
            error = self._part("error")(x - self.decode(latents), *args, **kwargs)
            return reconstruction + error
        self._part("error")(x - reconstruction, *args, **kwargs)
        return reconstruction
