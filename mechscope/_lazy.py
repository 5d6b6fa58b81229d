"""Lazy package namespaces (PEP 562): a package's public names are imported from their modules on first use.

``import mechscope.cooccurrence.outputs`` first runs ``mechscope/__init__.py`` and
``mechscope/cooccurrence/__init__.py``; with eager re-exports there, reading one results file imported torch's model
stack and transformers (seconds). A package built with :func:`lazy_exports` imports nothing until a name is asked
for, then exactly the module that defines it::

    if TYPE_CHECKING:  # the static view for mypy and IDEs
        from mechscope.sae.model import SAE
    else:
        __getattr__, __dir__ = lazy_exports(__name__, {"mechscope.sae.model": ["SAE"]})

``tests/test_imports.py`` checks that every package's table, its ``TYPE_CHECKING`` imports and ``__all__`` agree.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose names come from ``modules``
    (module path -> the names it exports).

    ``__getattr__(name)`` imports the module defining ``name`` and keeps the value in the package's namespace (so it
    is looked up once); a name that is not exported but is a submodule (``mechscope.sae.model``) is imported as the
    eager ``from ... import`` lines used to import it. ``__dir__`` lists the namespace and every exported name.
    """
    origin = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str) -> Any:
        namespace = vars(sys.modules[package])
        if name in origin:
            value = getattr(importlib.import_module(origin[name]), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(origin))

    return getattr_, dir_
