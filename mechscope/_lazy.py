"""Lazy package namespaces (PEP 562): a package's public names are imported from their modules on first use.

``import mechscope.cooccurrence.outputs`` first runs ``mechscope/__init__.py`` and
``mechscope/cooccurrence/__init__.py``; with eager re-exports there, reading one results file imported torch's model
stack and transformers (seconds). A package built with :func:`lazy_exports` imports nothing until a name is asked
for, then exactly the module that defines it. Its ``if TYPE_CHECKING:`` imports are the one list of what it exports
and from where: mypy and IDEs read them as written, and :func:`lazy_exports` reads the same lines from the source::

    if TYPE_CHECKING:
        from mechscope.sae.model import SAE
    else:
        __getattr__, __dir__ = lazy_exports(__name__)

``tests/test_imports.py`` checks that every package's ``TYPE_CHECKING`` imports and ``__all__`` agree.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def checking_imports(source: str) -> dict[str, str]:
    """``name -> module`` of the ``from module import name`` lines in the top-level ``if TYPE_CHECKING:`` block of
    ``source`` (a package's ``__init__``); empty when it has none."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            return {
                alias.asname or alias.name: str(line.module)
                for line in node.body
                if isinstance(line, ast.ImportFrom)
                for alias in line.names
            }
    return {}


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, which exports the names its ``__init__`` imports
    under ``if TYPE_CHECKING:`` (read from the file when a name is first asked for).

    ``__getattr__(name)`` imports the module defining ``name`` and keeps the value in the package's namespace (so it
    is looked up once); a name that is not exported but is a submodule (``mechscope.sae.model``) is imported as the
    eager ``from ... import`` lines used to import it. ``__dir__`` lists the namespace and every exported name.
    """

    @functools.cache
    def origin() -> dict[str, str]:
        init = sys.modules[package].__file__
        assert init is not None  # a package built from source
        return checking_imports(Path(init).read_text(encoding="utf-8"))

    def getattr_(name: str) -> Any:
        namespace = vars(sys.modules[package])
        if name in origin():
            value = getattr(importlib.import_module(origin()[name]), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(origin()))

    return getattr_, dir_
