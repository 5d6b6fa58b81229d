"""Analysis tools and the registry the experiment bench draws them from.

A tool is a class whose constructor takes the hooked model; the bench builds one instance per bench
the first time a function asks for it (``@exp.use_tools("residual")``). The registry maps a tool name to
its class, or to the dotted path of its class (``"mechscope.tools.svd.SVDInterpreter"``), which is
imported only when the tool is first used, so a tool's module is not imported by ``import mechscope``.

Register your own with :func:`register_tool`::

    @register_tool("my_tool")
    class MyTool(BaseInterpretabilityTool):
        def count_layers(self) -> int:
            return self.model.cfg.n_layers
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class BaseInterpretabilityTool:
    """Base class of tools (Arrakis's name): keeps the hooked model as ``self.model``."""

    def __init__(self, model: Any):
        self.model = model


_REGISTRY: dict[str, type | str] = {
    "superposition": "mechscope.tools.superposition.SuperpositionDisentangler",
    "residual": "mechscope.tools.residual.ResidualTools",
    "svd": "mechscope.tools.svd.SVDInterpreter",
    "logit_lens": "mechscope.tools.logit_lens.LogitLens",
    "attention": "mechscope.tools.attention.AttentionTools",
    "composition": "mechscope.tools.composition.CompositionScores",
    "sparsity": "mechscope.tools.sparsity.SparsityTools",
    "patching": "mechscope.tools.patching.ActivationPatching",
    "causal": "mechscope.tools.causal.CausalTracer",
    "neurons": "mechscope.tools.neurons.NeuronTools",
    "surgery": "mechscope.tools.surgery.BlockSurgery",
}


def register_tool(name: str, tool: type | str | None = None, overwrite: bool = False) -> Any:
    """Register ``tool`` (a class taking the model, or the dotted path of one) under ``name``.

    Without ``tool`` it returns a class decorator: ``@register_tool("name")``. Registering a name that
    exists raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"tool name {name!r} must be a Python identifier: use_tools passes the tool as the keyword argument "
            "of that name"
        )

    def add(t: type | str) -> type | str:
        if not (isinstance(t, str) or callable(t)):
            raise TypeError(f"a tool is a class taking the model, or its dotted path; got {type(t).__name__}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not t:
            raise ValueError(f"a tool named {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = t
        return t

    return add if tool is None else add(tool)


def available_tools() -> list[str]:
    """Every registered tool name, sorted."""
    return sorted(_REGISTRY)


def get_tool_class(name: str) -> Callable[[Any], Any]:
    """The class registered under ``name``, importing its module now if it was registered by path."""
    if name not in _REGISTRY:
        raise KeyError(f"no tool named {name!r}; registered tools: {', '.join(available_tools())}")
    spec = _REGISTRY[name]
    if not isinstance(spec, str):
        return spec
    module_name, _, attr = spec.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"tool {name!r} is registered as {spec}, which cannot be imported ({e}): register it again with the "
            f"dotted path of an importable class, register_tool({name!r}, 'package.module.Class', overwrite=True)"
        ) from e
