"""The hook registry: which user functions are attached to which hook names.

A hook function has the TransformerLens signature ``fn(tensor, hook) -> tensor | None``. ``hook`` is a
:class:`HookPoint` carrying the point's ``name`` (and ``layer()``). Returning a tensor replaces the
activation; editing the tensor in place and returning ``None`` also counts as an edit (detected through
the tensor's version counter), so the change flows downstream either way. Under
``torch.inference_mode()`` tensors have no version counter, so a hook that returns ``None`` there is
taken as a possible in-place edit; mark hooks that only read with :func:`read_only` to keep the fast
path (mechscope's caching hooks are marked).

Backward hooks have the signature ``fn(grad, hook) -> grad | None`` and receive the gradient of the
activation at that point; they are attached as tensor hooks during the forward pass and fire in
``.backward()``.

The registry holds no PyTorch hooks itself: :mod:`mechscope.models.points` installs those, only for the
names that have a function attached, and removes them whenever the registry changes.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mechscope.models.names import hook_layer

HookFn = Callable[..., "torch.Tensor | None"]

#: attribute marking a hook function that never edits its tensor (mechscope's own caching hooks)
READ_ONLY = "_mechscope_read_only"


def read_only(fn: HookFn) -> HookFn:
    """Mark ``fn`` as a hook that only reads: the registry then skips edit detection for it."""
    setattr(fn, READ_ONLY, True)
    return fn


@dataclass
class HookPoint:
    """What a hook function receives as ``hook``: the point's name and a scratch ``ctx`` dict."""

    name: str
    ctx: dict = field(default_factory=dict)

    def layer(self) -> int | None:
        """The block index of this point (``blocks.L....``), or ``None`` for points outside the blocks."""
        return hook_layer(self.name)


class HookRegistry:
    """Forward and backward hook functions per hook name, in the order they were added."""

    def __init__(self) -> None:
        self.fwd: dict[str, list[HookFn]] = {}
        self.bwd: dict[str, list[HookFn]] = {}
        self._points: dict[str, HookPoint] = {}

    def add(self, name: str, fn: HookFn, direction: str = "fwd") -> None:
        if direction not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {direction!r}")
        if not callable(fn):
            raise TypeError(
                f"the hook function for {name} must be callable as fn(tensor, hook), got {type(fn).__name__} {fn!r}"
            )
        if not _takes_tensor_and_hook(fn):
            raise TypeError(
                f"hook {getattr(fn, '__name__', fn)!r} for {name} cannot be called as fn(tensor, hook): give it two "
                "parameters, e.g. def fn(tensor, hook)"
            )
        table = self.fwd if direction == "fwd" else self.bwd
        table.setdefault(name, []).append(fn)

    def remove(self, name: str, fn: HookFn, direction: str = "fwd") -> None:
        table = self.fwd if direction == "fwd" else self.bwd
        fns = table.get(name, [])
        for i in range(len(fns) - 1, -1, -1):  # the latest addition first: nested contexts unwind in order
            if fns[i] is fn:
                del fns[i]
                break
        if not fns:
            table.pop(name, None)

    def clear(self) -> None:
        self.fwd.clear()
        self.bwd.clear()

    def active_names(self) -> set[str]:
        return set(self.fwd) | set(self.bwd)

    def has_bwd(self, name: str) -> bool:
        return name in self.bwd

    def point(self, name: str) -> HookPoint:
        if name not in self._points:
            self._points[name] = HookPoint(name)
        return self._points[name]

    def __call__(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Run the hooks of ``name`` on ``tensor``.

        Returns ``(value, edited)``: the value after every forward hook, and whether any hook replaced
        it or changed it in place. Backward hooks are attached to the final value.
        """
        edited = False
        hook = self.point(name)
        for fn in self.fwd.get(name, ()):
            read_only = getattr(fn, READ_ONLY, False)
            # inference-mode tensors keep no version counter: a hook returning None may have edited in place
            version = None if read_only or tensor.is_inference() else tensor._version
            out = fn(tensor, hook)
            if out is not None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"hook {getattr(fn, '__name__', fn)!r} on {name} returned {type(out).__name__}; "
                        "a hook returns a tensor (the replacement) or None"
                    )
                _check_like(fn, name, out, tensor, "activation")
                tensor, edited = out, True
            elif not read_only and (version is None or tensor._version != version):
                edited = True
        bwd_fns = self.bwd.get(name)
        if bwd_fns and tensor.requires_grad:
            tensor.register_hook(_grad_hook(list(bwd_fns), hook))
        return tensor, edited


_BINDS: dict[tuple[types.CodeType, int, tuple[str, ...]], bool] = {}  # what _takes_tensor_and_hook found per code


def _takes_tensor_and_hook(fn: HookFn) -> bool:
    """Whether ``fn(tensor, hook)`` binds to ``fn``'s signature (True when Python cannot tell, as for builtins).

    A plain function's answer depends only on its code and on which of its parameters have defaults, so it is
    asked once per code object: ``run_with_cache`` makes a new closure on every call, and ``inspect.signature``
    would otherwise cost ~12 µs per hook added."""
    if type(fn) is not types.FunctionType or hasattr(fn, "__signature__") or hasattr(fn, "__wrapped__"):
        return _binds(fn)
    key = (fn.__code__, len(fn.__defaults__ or ()), tuple(sorted(fn.__kwdefaults__ or ())))
    if key not in _BINDS:
        if len(_BINDS) >= 4096:  # code made on the fly (exec, lambdas in a loop of modules): keep it bounded
            _BINDS.clear()
        _BINDS[key] = _binds(fn)
    return _BINDS[key]


def _binds(fn: HookFn) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect
        return True
    return True
    return True


def _check_like(fn: HookFn, name: str, out: torch.Tensor, value: torch.Tensor, what: str) -> None:
    """Refuse a hook's replacement ``out`` whose shape, dtype or device differ from the ``value`` it replaces."""
    for prop in ("shape", "dtype", "device"):
        got, want = getattr(out, prop), getattr(value, prop)
        if got != want:
            got, want = (tuple(got), tuple(want)) if prop == "shape" else (got, want)
            fix = f"return a tensor of the same {prop}" + (f" (out.to({want}))" if prop != "shape" else "")
            raise ValueError(
                f"hook {getattr(fn, '__name__', fn)!r} on {name} returned {prop} {got}, "
                f"but the {what} has {prop} {want}: {fix}"
            )


def _grad_hook(fns: list[HookFn], hook: HookPoint) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(grad: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            out = fn(grad, hook)
            if out is not None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"backward hook {getattr(fn, '__name__', fn)!r} on {hook.name} returned "
                        f"{type(out).__name__}; a backward hook returns a tensor (the new gradient) or None"
                    )
                _check_like(fn, hook.name, out, grad, "gradient")
                grad = out
        return grad

    return run
