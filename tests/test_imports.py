"""The packages' lazy namespaces (mechscope._lazy): every public name imports as it did when the ``__init__`` files
imported eagerly, ``dir()`` lists them, and reading results or starting the explorer does not import transformers."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mechscope

ROOT = Path(mechscope.__file__).parent
PACKAGES = sorted(
    ".".join(p.relative_to(ROOT.parent).parent.parts)
    for p in ROOT.rglob("__init__.py")
    if "__all__" in p.read_text(encoding="utf-8")
)


def static_exports(package: str) -> tuple[dict[str, str], list[str]]:
    """From the ``__init__`` source, read plainly here: ``name -> module`` of its ``if TYPE_CHECKING:`` imports (the
    names the lazy namespace serves) and its ``__all__``."""
    tree = ast.parse((ROOT.parent / package.replace(".", "/") / "__init__.py").read_text(encoding="utf-8"))
    checking, names = {}, []
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            checking = {a.asname or a.name: n.module for n in node.body for a in n.names}
            assert ast.unparse(node.orelse[0].value) == "lazy_exports(__name__)"
        elif isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__":
            names = ast.literal_eval(node.value)
    return checking, names


def fresh(code: str) -> str:
    """The standard output of ``code`` run in a new interpreter (nothing imported yet)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def test_every_package_with_exports_is_checked():
    assert {"mechscope", "mechscope.sae", "mechscope.cooccurrence", "mechscope.models"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_static_imports_and_all_agree(package: str) -> None:
    checking, names = static_exports(package)
    eager = {n for n in names if n not in checking}
    assert set(checking) | eager == set(names)
    module = importlib.import_module(package)
    for name in eager:  # a name imported eagerly (``__version__``) is in the namespace already
        assert name in vars(module)


def test_every_public_name_imports_from_the_module_that_defines_it():
    """``from package import name`` for every name of every package's ``__all__``, in a fresh interpreter: the
    object is the one its module defines, and ``dir(package)`` listed it before the name was asked for."""
    tables = {package: static_exports(package) for package in PACKAGES}
    code = f"""
import importlib, json
seen = {{}}
for package, (table, names) in {tables!r}.items():
    listed = dir(importlib.import_module(package))
    origin = {{name: getattr(importlib.import_module(module), name) for name, module in table.items()}}
    for name in names:
        value = getattr(importlib.import_module(package), name)
        exec(f"from {{package}} import {{name}} as imported")
        same = imported is value and (name not in origin or value is origin[name])
        seen[f"{{package}}.{{name}}"] = [name in listed, same]
print(json.dumps(seen))
"""
    seen = json.loads(fresh(code))
    expected = {f"{package}.{name}": [True, True] for package, (_, names) in tables.items() for name in names}
    assert seen == expected


def test_an_unknown_name_is_an_attribute_error_and_submodules_stay_reachable():
    sae = importlib.import_module("mechscope.sae")
    with pytest.raises(AttributeError, match=r"module 'mechscope\.sae' has no attribute 'no_such_name'"):
        sae.no_such_name  # noqa: B018
    assert sae.model is sys.modules["mechscope.sae.model"]  # reachable as the eager imports made it
    assert mechscope.cooccurrence.counting.jaccard is mechscope.cooccurrence.jaccard


LIGHT = [  # modules that import neither transformers nor torch (seconds, and a second, to import)
    "mechscope.cooccurrence.layout",
    "mechscope.cooccurrence.records",
    "mechscope.dashboards.layout",
    "mechscope.apps.explorer.results",
    "mechscope.apps.explorer.cooc_view",
    "mechscope.apps.explorer.latent_view",
    "mechscope.apps.cli",
]
NO_TRANSFORMERS = ["mechscope.cooccurrence.outputs", "mechscope.dashboards.outputs"]  # torch, but no model stack


def test_reading_results_and_the_explorers_first_pages_import_no_transformers_and_no_torch():
    """The modules the explorer's co-occurrence and latent pages import, and the command line that starts it, leave
    transformers and torch unimported; the writers of results import torch but not transformers; the prompt
    inspector, which loads the model, imports both (so the checks can see them)."""
    modules = LIGHT + NO_TRANSFORMERS + ["mechscope.apps.explorer.inspector_view"]  # in this order, in one process
    code = "import importlib, sys\n" + "".join(
        f"importlib.import_module({m!r}); print({m!r}, 'transformers' in sys.modules, 'torch' in sys.modules)\n"
        for m in modules
    )
    shown = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in fresh(code).splitlines()}
    expected = {m: "False False" for m in LIGHT} | {m: "False True" for m in NO_TRANSFORMERS}
    assert shown == expected | {"mechscope.apps.explorer.inspector_view": "True True"}
