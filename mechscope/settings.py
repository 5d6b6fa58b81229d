"""Configs, declared once and loaded one way: defaults -> a TOML file -> overrides (command-line flags).

A config is a dataclass that subclasses :class:`Config` and gives each field :func:`meta` as its metadata: a
one-line help (the ``--help`` text of its flag) and, for a renamed field, the names it had before. A
field whose type is another config nests it: the TOML table ``[train]``, the flags ``--train.k``. A config's
``__post_init__`` calls :func:`check_fields` (types, nested configs) and raises :class:`ConfigError` through
:func:`fail` / :func:`at_least` for the rest, so every message names the field the same way (:func:`label`).

- :func:`load` (``Config.from_toml``): a config from its defaults, a TOML file and overrides. Errors are
  :class:`ConfigError` naming the file and the field; a key or flag read under an old name works, with a
  :class:`DeprecatedSetting` warning naming the new one.
- :func:`write_toml` (``Config.to_toml``): the TOML file (written with tomli-w) that :func:`load` reads back to an
  equal config.
- :func:`add_flags` and :func:`flag_values`: one ``argparse`` flag per setting (``hook_name`` -> ``--hook-name``,
  nested ``train.n_tokens`` -> ``--train.n-tokens``, booleans also ``--no-...``), and the values given.

A config that nests others may set some of their fields from its own (:meth:`Config.derived`), so that a fact
shared by two nested configs has one owner; those fields get no flag and are refused in a file.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import argparse
import dataclasses
import difflib
import math
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeGuard, TypeVar

import tomli_w
import torch

from mechscope.files import atomic_write_text
from mechscope.models.names import parse_hook


class ConfigError(ValueError):
    """A config that cannot be used: the message names the file (when read from one), the field and the fix.

    ``field`` is the dotted path of the offending setting in the config being built (``"counting.n_batches"``),
    when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DeprecatedSetting(FutureWarning):
    """A setting read under a name it had before (a TOML key or a flag); the message names the new one."""


C = TypeVar("C", bound="Config")
Path_ = tuple[str, ...]


class Config:
    """Base of mechscope's dataclass configs: :meth:`from_toml`, :meth:`to_toml` and :meth:`derived`.

    ``LABEL`` prefixes a field's name in messages: ``"[counting]."`` for a TOML table, ``"TrainConfig."`` for a
    config named by its class, ``""`` for the top level of a file. ``RETIRED`` maps keys that are no longer used to
    why: a file that still has one is read without it, with a :class:`DeprecatedSetting` warning saying why.
    """

    LABEL: ClassVar[str] = ""
    RETIRED: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_toml(cls: type[C], path: str | Path, **overrides: Any) -> C:
        """The config in the TOML file ``path`` with ``overrides`` (field names, dotted for nested ones) on top."""
        return load(cls, path, overrides)

    def to_toml(self, path: str | Path) -> Path:
        """Write the config to ``path`` as TOML that :meth:`from_toml` reads back to an equal config."""
        return write_toml(self, path)

    def derived(self) -> dict[str, Any]:
        """Settings of nested configs that this config sets from its own fields, by dotted path (none here)."""
        return {}


def meta(
    help: str, *, old: str | Sequence[str] = (), moved: Mapping[str, str] | None = None, required: bool = False
) -> dict[str, Any]:
    """The ``metadata`` of a config field: ``field(default=100, metadata=meta("batches to count"))``.

    - ``help``: the field's one-line help, the ``--help`` text of its flag.
    - ``old``: names this field had before; a file or flag that still uses one is read, with a
      :class:`DeprecatedSetting` warning naming the new name.
    - ``moved`` (a nested config's field): ``{old key at this level: its path inside this field}`` for settings
      that moved into the nested config, read the same way.
    - ``required``: a file must give it, although Python code may leave the default.
    """
    if not help:
        raise TypeError("a config field needs its help text")
    names = (old,) if isinstance(old, str) else tuple(old)
    return {"help": help, "old": names, "moved": dict(moved or {}), "required": required}


# ---- checking values ---------------------------------------------------------------------------------------


def label(config: Any, name: str) -> str:
    """How messages name the field ``name`` of ``config`` (a config or its class): ``[counting].n_batches``."""
    return f"{config.LABEL}{name}"


def fail(config: Any, name: str, text: str) -> ConfigError:
    """The error ``"{label} {text}"`` about the field ``name`` of ``config``, to raise."""
    return ConfigError(f"{label(config, name)} {text}", field=name)


def at_least(config: Any, low: float, *names: str) -> None:
    """Fail on the first of the fields ``names`` of ``config`` that is below ``low`` or not a finite number (nan,
    inf); a field left at None (not set) passes."""
    for name in names:
        _check_number(config, name, lambda v: v >= low, f"at least {low}")


def above(config: Any, low: float, *names: str) -> None:
    """Fail on the first of the fields ``names`` of ``config`` that is not a finite number greater than ``low``
    (a learning rate, a kernel width); a field left at None passes."""
    for name in names:
        _check_number(config, name, lambda v: v > low, f"greater than {low}")


def between(config: Any, low: float, high: float, *names: str, high_open: bool = False) -> None:
    """Fail on the first of the fields ``names`` of ``config`` outside ``[low, high]`` (``[low, high)`` with
    ``high_open``: Adam's betas) or not a finite number; a field left at None passes."""
    shown = f"in [{low}, {high}{')' if high_open else ']'}"
    for name in names:
        _check_number(config, name, lambda v: low <= v and (v < high if high_open else v <= high), shown)


def _check_number(config: Any, name: str, ok: Callable[[float], bool], wanted: str) -> None:
    value = getattr(config, name)
    if value is None:
        return
    if not math.isfinite(value):
        raise fail(config, name, f"must be a finite number {wanted}, got {value}")
    if not ok(value):
        raise fail(config, name, f"must be {wanted}, got {value}")


def device_problem(name: str) -> str | None:
    """Why the torch device ``name`` cannot be used on this machine (not a device, no such accelerator, an index
    past the last one), or None when it can: ``"cpu"``, and ``"cuda"``/``"cuda:1"``/``"mps"``/... when torch sees
    that device."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"{name!r} is not a torch device: use one of {', '.join(available_devices())}"
    if device.type == "cpu":
        return None
    count = _device_count(device.type)
    if count == 0:
        return (
            f"{name!r} is not available on this machine (torch {torch.__version__} sees no {device.type} device): "
            f"use one of {', '.join(available_devices())}"
        )
    if device.index is not None and device.index >= count:
        return f"{name!r} does not exist: this machine has {count} {device.type} device(s); use one of " + ", ".join(
            available_devices()
        )
    return None


def _device_count(kind: str) -> int:
    """How many ``kind`` devices torch sees (0 for meta and other kinds without devices of their own)."""
    backend = getattr(torch, kind, None)
    count = getattr(backend, "device_count", None)
    return int(count()) if callable(count) else 0


def available_devices() -> list[str]:
    """The devices of this machine as a config names them: ``["cpu", "cuda", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    for kind in ("cuda", "mps", "xpu"):
        count = _device_count(kind)
        if count:
            out += [kind, *(f"{kind}:{i}" for i in range(count))]
    return out


def check_device(config: Any, *names: str) -> None:
    """Fail on the first of the fields ``names`` of ``config`` that names a device this machine does not have."""
    for name in names:
        problem = device_problem(getattr(config, name))
        if problem is not None:
            raise fail(config, name, problem)


def check_hook_names(config: Any, *names: str) -> None:
    """Fail on the first of the fields ``names`` of ``config`` (a hook name, a list of them, or None) holding
    something that is not a hook name; the message names the field and the valid forms."""
    for name in names:
        value = getattr(config, name)
        for hook in [value] if isinstance(value, str) else value or []:
            try:
                parse_hook(hook)
            except (TypeError, ValueError) as e:
                raise fail(config, name, f"holds {hook!r}, which is not a hook name: {e}") from None


def check_paths(config: Any, *names: str) -> None:
    """Fail on the first of the fields ``names`` of ``config`` that is an empty path."""
    for name in names:
        if not str(getattr(config, name)):
            raise fail(config, name, "is empty: give the directory the run writes to")


def check_fields(config: Any) -> None:
    """Check every field of the dataclass ``config`` against its annotation (a nested config must be an
    instance of its class); tuples given for list fields become lists."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        if _is_config(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"[{f.name}] must be a {hint.__name__}, got {type(value).__name__}", field=f.name)
            continue
        if isinstance(value, tuple) and typing.get_origin(without_none(hint)) is list:
            value = list(value)
            setattr(config, f.name, value)
        if not matches(value, hint):
            raise fail(config, f.name, f"must be {type_name(hint)}, got {value!r}")


def without_none(hint: Any) -> Any:
    """``X`` for ``X | None``; ``hint`` otherwise."""
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as TOML or Python gives it) fits the annotation ``hint``; ints count as floats."""
    origin = typing.get_origin(hint)
    if isinstance(hint, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(matches(k, key) and matches(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    """``int``, ``list[float]``, ``str | dict[str, str] | None``: the annotation as written."""
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("NoneType", "None")


def _is_config(hint: Any) -> TypeGuard[type]:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


# ---- the schema of a config class: its settings, tables, old names and derived fields ---------------------


@dataclass(frozen=True)
class _Leaf:
    path: Path_
    hint: Any
    default: Any  # MISSING when required
    help: str


@dataclass(frozen=True)
class _Schema:
    leaves: tuple[_Leaf, ...]
    tables: dict[Path_, tuple[type, str]]  # path of a nested config -> (its class, the help of its field)
    renames: tuple[tuple[Path_, Path_], ...]  # (old path, new path), outer ones first
    derived: frozenset[str]  # dotted paths the configs set themselves


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    """The settings, tables, renames and derived paths of the config class ``cls`` (computed once)."""
    if cls not in _SCHEMAS:
        _SCHEMAS[cls] = _make_schema(cls)
    return _SCHEMAS[cls]


def _make_schema(cls: type) -> _Schema:
    leaves: list[_Leaf] = []
    tables: dict[Path_, tuple[type, str]] = {}
    renames: list[tuple[Path_, Path_]] = []
    derived: set[str] = set()

    def walk(config_cls: Any, instance: Any, path: Path_) -> None:
        if instance is not None:
            derived.update(".".join((*path, d)) for d in instance.derived())
        elif config_cls.derived is not Config.derived:
            raise TypeError(f"{config_cls.__name__} derives settings, so every field of it needs a default")
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            here = (*path, f.name)
            if "help" not in f.metadata:
                raise TypeError(f"{config_cls.__name__}.{f.name} has no help: declare it with metadata=meta(...)")
            renames.extend(((*path, o), here) for o in f.metadata.get("old", ()))
            renames.extend(((*path, o), (*here, *new.split("."))) for o, new in f.metadata.get("moved", {}).items())
            default = getattr(instance, f.name) if instance is not None else _default(f)
            if _is_config(hints[f.name]):
                tables[here] = (hints[f.name], f.metadata["help"])
                walk(hints[f.name], None if default is MISSING else default, here)
            elif ".".join(here) not in derived:
                leaves.append(_Leaf(here, hints[f.name], default, f.metadata["help"]))

    # the defaults of a config whose fields all have one are those of its default instance (derived ones included)
    root = cls() if all(_default(f) is not MISSING for f in dataclasses.fields(cls)) else None
    walk(cls, root, ())
    return _Schema(tuple(leaves), tables, tuple(renames), frozenset(derived))


def _key(path: Path_) -> str:
    """A setting's place in a file: ``results_dir``, ``[counting].n_batches``."""
    return path[-1] if len(path) == 1 else f"[{'.'.join(path[:-1])}].{path[-1]}"


def _table(path: Path_) -> str:
    return f"[{'.'.join(path)}]" if path else "top level"


# ---- loading -----------------------------------------------------------------------------------------------


def load(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """The config ``cls`` from its defaults, then the TOML file ``path`` (if given), then ``overrides``.

    ``overrides`` are settings by dotted path (``{"train.k": 16}``, as :func:`flag_values` gives them) or nested
    tables. Errors are :class:`ConfigError`; those about a setting read from the file name the file.
    """
    from_file: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"config file {path} is a directory: give the path of a TOML file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist: give the path of a TOML file")
        with open(path, "rb") as f:
            try:
                from_file = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path} is not valid TOML: {e}") from None
        try:
            from_file = _renamed(cls, from_file, f"{path}: ")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}", field=e.field) from None
    given: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        *tables, name = key.split(".")
        node = given
        for table in tables:
            node = node.setdefault(table, {})
        node[name] = value
    given = _renamed(cls, given, "")
    merged = _merged(cls, from_file, given)
    try:
        return _build(cls, merged, (), None, _schema(cls).derived, cls)
    except ConfigError as e:
        if path is None or e.field in set(_dotted(given)):
            raise
        raise ConfigError(f"{path}: {e}", field=e.field) from None


def _dotted(values: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted paths of ``values`` and of every table in it."""
    for key, value in values.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")


def _renamed(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (TOML-shaped) with every setting given under an old name moved to its new one, with a warning.
    Messages name a key as it was given: ``[generation].model_name`` when the table was renamed too."""
    values = _copy_tables(values)
    given: dict[Path_, Path_] = {}  # tables moved so far: new path -> the path they were given under

    def as_given(path: Path_) -> Path_:
        for moved, before in given.items():
            if path[: len(moved)] == moved:
                return (*before, *path[len(moved) :])
        return path

    for old, new in _schema(cls).renames:
        parent = _find(values, old[:-1])
        if parent is None or old[-1] not in parent:
            continue
        value = parent.pop(old[-1])
        if isinstance(value, dict):
            given[new] = as_given(old)
        target = values
        for table in new[:-1]:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{_table(new[:-1])} must be a table, got {target!r}", field=".".join(new[:-1]))
        name = _table if isinstance(value, dict) else _key  # a table is named [generation], a key [counting].model
        shown, wanted = name(as_given(old)), name(new)
        if new[-1] in target:
            raise ConfigError(
                f"both {shown} and {wanted} are given: {shown} is the old name, keep {wanted} only",
                field=".".join(new),
            )
        warnings.warn(f"{where}{shown} is deprecated: use {wanted}", DeprecatedSetting, stacklevel=3)
        target[new[-1]] = value
    return values


def _copy_tables(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy_tables(v) if isinstance(v, dict) else v for k, v in values.items()}


def _find(values: dict[str, Any], path: Path_) -> dict[str, Any] | None:
    for table in path:
        values = values.get(table)  # type: ignore[assignment]
        if not isinstance(values, dict):
            return None
    return values


def _merged(cls: type, base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, table by table for the nested configs of ``cls``."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in over.items():
        hint = hints.get(key)
        if _is_config(hint) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(hint, out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, given: Mapping[str, Any], path: Path_, base: Any, derived: frozenset[str], root: type) -> Any:
    """A ``cls`` from the TOML-shaped ``given``: on top of ``base`` (an instance), or of ``cls``'s defaults.
    ``derived`` are the dotted paths the ``root`` config sets itself."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in given:
        dotted = ".".join((*path, key))
        if dotted in derived:
            raise ConfigError(
                f"{_key((*path, key))} is set by {root.__name__} from its own settings: leave it out, "
                f"and set the one it comes from (see {root.__name__}.derived)",
                field=key,
            )
        retired: Mapping[str, str] = getattr(cls, "RETIRED", {})
        if key not in fields and key in retired:
            why = retired[key]
            warnings.warn(f"{_key((*path, key))} is no longer used ({why}): remove it", DeprecatedSetting, stacklevel=4)
        elif key not in fields:
            known = [name for name in fields if ".".join((*path, name)) not in derived]
            raise ConfigError(_unknown(cls, path, key, known), field=key)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        here = (*path, name)
        if _is_config(hints[name]):
            sub_base = getattr(base, name) if base is not None else _default(f)
            if name in given:
                table = given[name]
                if not isinstance(table, dict):
                    raise ConfigError(f"{_table(here)} must be a table, got {table!r}", field=name)
                try:
                    sub = None if sub_base is MISSING else sub_base
                    kwargs[name] = _build(hints[name], table, here, sub, derived, root)
                except ConfigError as e:
                    e.field = f"{name}.{e.field}" if e.field else name
                    raise
            elif sub_base is MISSING:
                needs = _required(hints[name])
                raise ConfigError(f"missing table {_table(here)} (it needs {' and '.join(needs)})", field=name)
        elif name in given:
            kwargs[name] = given[name]
        elif base is None and (f.metadata.get("required") or _default(f) is MISSING):
            raise ConfigError(f"missing {_key(here)}", field=name)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("required") or _default(f) is MISSING]


def _unknown(cls: Any, path: Path_, key: str, known: list[str]) -> str:
    """``unknown key [counting].n_batchs in [counting]; did you mean [counting].n_batches?``"""
    close = difflib.get_close_matches(key, known, n=1)
    if path or not cls.LABEL.endswith("."):
        shown, where, prefix = _key((*path, key)), _table(path), _key((*path, ""))
    else:  # a config named by its class: TrainConfig.learning_rate would read as a field it has
        shown, where, prefix = repr(key), cls.LABEL[:-1], ""
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid: {', '.join(known)}"
    return f"unknown key {shown} in {where}; {hint}"


# ---- derived settings and writing -----------------------------------------------------------------------------


def derive(config: Config) -> None:
    """Set the nested settings ``config.derived()`` names (each nested config is rebuilt, so it is checked)."""
    tables: dict[str, dict[str, Any]] = {}
    for dotted, value in config.derived().items():
        name, rest = dotted.split(".", 1)
        tables.setdefault(name, {})[rest] = value
    for name, values in tables.items():
        setattr(config, name, _replaced(getattr(config, name), values))


def _replaced(config: Any, values: Mapping[str, Any]) -> Any:
    """``config`` with the settings ``values`` (dotted paths inside it) replaced."""
    own = {k: v for k, v in values.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        if "." in dotted:
            name, rest = dotted.split(".", 1)
            nested.setdefault(name, {})[rest] = value
    own.update({name: _replaced(getattr(config, name), sub) for name, sub in nested.items()})
    return dataclasses.replace(config, **own)


def to_dict(config: Any) -> dict[str, Any]:
    """``config`` as TOML-shaped data: nested configs as tables; settings that are None (TOML has no null) and
    the derived ones are left out."""
    derived = _schema(type(config)).derived

    def table(obj: Any, path: Path_) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value, here = getattr(obj, f.name), ".".join((*path, f.name))
            if value is None or here in derived:
                continue
            out[f.name] = table(value, (*path, f.name)) if _is_config(type(value)) else value
        return out

    return table(config, ())


def write_toml(config: Any, path: str | Path) -> Path:
    """Write ``config`` to ``path`` (atomically) as TOML that :func:`load` reads back to an equal config."""
    return atomic_write_text(path, tomli_w.dumps(to_dict(config)))


# ---- command-line flags ---------------------------------------------------------------------------------------


def _flag(path: Path_, negated: bool = False) -> str:
    *tables, name = (p.replace("_", "-") for p in path)
    return "--" + ".".join([*tables, f"no-{name}" if negated else name])


def _number(text: str) -> int | float:
    """A float flag's value: ``8`` stays an int (as TOML reads it), ``1e-3`` is a float; anything else is refused
    naming the forms a number takes (argparse shows the message after the flag's name)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give an int or a float such as 3e-4") from None


class _FlagAction(argparse.Action):
    """Stores a setting's value under its dotted path; a switch (``--x`` / ``--no-x``) takes no value, and an old
    flag warns naming its new one (``renamed``: old option string -> new)."""

    def __init__(
        self,
        option_strings: list[str],
        dest: str,
        negated: Sequence[str] = (),
        renamed: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.negated, self.renamed = tuple(negated), dict(renamed or {})

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if option_string in self.renamed:
            warnings.warn(
                f"{option_string} is deprecated: use {self.renamed[option_string]}", DeprecatedSetting, stacklevel=2
            )
        setattr(namespace, self.dest, option_string not in self.negated if self.nargs == 0 else values)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of the config ``cls``, with its help and default; nested configs' flags are dotted
    (``--train.n-tokens``) and grouped by table. Flags not given stay absent from the namespace
    (:func:`flag_values` collects the given ones), so a file's values are not overridden by defaults."""
    schema = _schema(cls)
    groups: dict[Path_, Any] = {(): parser}
    for path, (table_cls, text) in schema.tables.items():
        if any(leaf.path[:-1] == path for leaf in schema.leaves):
            title = f"{'.'.join(path)} ({table_cls.__name__})"
            groups[path] = parser.add_argument_group(title, text.replace("%", "%%"))
    for leaf in schema.leaves:
        base = without_none(leaf.hint)
        if isinstance(base, types.UnionType):  # e.g. str | dict[str, str]: a flag gives the scalar form
            base = typing.get_args(base)[0]
        shown = "required" if leaf.default is MISSING else leaf.default
        options: dict[str, Any] = {"dest": ".".join(leaf.path), "default": argparse.SUPPRESS}
        if base is bool:
            options["nargs"] = 0
        elif typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            options.update(nargs="+", type=_number if item is float else item, metavar=item.__name__.upper())
        else:
            options.update(type=_number if base is float else base, metavar=base.__name__.upper())
        old = [o + leaf.path[len(n) :] for o, n in schema.renames if leaf.path[: len(n)] == n]
        switch = [False, True] if base is bool else [False]
        negated = [_flag(p, True) for p in (leaf.path, *old)] if base is bool else []
        renamed = {_flag(o, neg): _flag(leaf.path, neg) for o in old for neg in switch}
        group = groups[leaf.path[:-1]]
        help_text = f"{leaf.help} (default: {shown})".replace("%", "%%")
        flags = [_flag(leaf.path, neg) for neg in switch]
        group.add_argument(*flags, action=_FlagAction, negated=negated, help=help_text, **options)
        if renamed:
            group.add_argument(
                *renamed, action=_FlagAction, negated=negated, renamed=renamed, help=argparse.SUPPRESS, **options
            )


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` given as flags in ``args``, by dotted path (the ``overrides`` of :func:`load`)."""
    given = vars(args)
    return {d: given[d] for d in (".".join(leaf.path) for leaf in _schema(cls).leaves) if d in given}
