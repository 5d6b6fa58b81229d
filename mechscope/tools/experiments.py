"""The experiment bench: inject tools into experiment functions and record every call.

``BaseInterpretabilityBench(model, save_dir)`` (alias ``Experiment``) holds a model and its tools.
``@exp.use_tools("residual", ...)`` passes each named tool as the keyword argument of the same name and
records every call of the function under ``save_dir/<function name>/<run id>/``:

- ``run.json``: the function's name, module and source with its SHA-256, the arguments (tensors
  summarised: shape, dtype, a hash, a few statistics), the model's identity (name, family, config,
  parameter count, hashes of the parameter shapes and of the weights), start time (UTC), duration,
  status ("ok" or "error" with the exception), library versions, and the layout of the result;
- ``result.safetensors``: every tensor (and numpy array) found in the result.

The result is stored as JSON with tensors replaced by references into the safetensors file; tuples,
dicts with non-string keys, numpy arrays and numpy scalars are tagged so :meth:`load_run` rebuilds
them. Anything else (a figure, a model, a custom object) cannot be stored safely: it is recorded as its
type and ``repr`` with a warning, and comes back from :meth:`load_run` as an :class:`UnstoredValue`.
Only safe formats are written (no pickle). Run ids are ``<UTC time to the microsecond>-<8 random hex>``,
and a run's folder is created exclusively, so runs never overwrite each other, also across processes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from mechscope.files import atomic_write, atomic_write_text, process_alive
from mechscope.tools import available_tools, get_tool_class

_TAG = "__mechscope__"  # key marking an encoded (non-plain-JSON) value in result.json
_MAX_ITEMS = 100  # items of a list argument summarised one by one; longer lists are abbreviated
_MAX_REPR = 500  # characters of an argument's repr kept
_MAX_UNSTORED_REPR = 10_000  # characters of an unstored result's repr kept
_MAX_DEPTH = 100  # nesting levels stored; deeper parts are recorded as unstored


class ExperimentRecordWarning(UserWarning):
    """Part of a run could not be recorded (an unstorable result or argument), or a record could not be read."""


@dataclasses.dataclass(frozen=True)
class UnstoredValue:
    """Stands in, in a loaded result, for a value the bench could not store safely: its type and repr."""

    type: str
    repr: str


class ToolBox(MutableMapping):
    """``exp.tools``: tool instances by name, each built from the registry on first use.

    Names are the registered tools (:func:`mechscope.tools.register_tool`) plus any instance set here,
    as Arrakis benches do in their constructor: ``self.tools.update({"custom": CustomTool(model)})``.
    """

    def __init__(self, model: Any):
        self.model = model
        self._instances: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._instances:
            if name not in available_tools():
                raise KeyError(f"no tool named {name!r}; available tools: {', '.join(self)}")
            self._instances[name] = get_tool_class(name)(self.model)
        return self._instances[name]

    def __setitem__(self, name: str, tool: Any) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"tool name {name!r} must be a Python identifier (it becomes a keyword argument)")
        self._instances[name] = tool

    def __delitem__(self, name: str) -> None:
        del self._instances[name]

    def __contains__(self, name: object) -> bool:
        return name in self._instances or name in available_tools()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._instances) | set(available_tools())))

    def __len__(self) -> int:
        return len(set(self._instances) | set(available_tools()))


class BaseInterpretabilityBench:
    """A model, its tools, and a record of every experiment run (alias ``Experiment``).

    Subclass it as in Arrakis, adding tools in the constructor if you like::

        class MIExperiment(BaseInterpretabilityBench):
            def __init__(self, model, save_dir="experiments"):
                super().__init__(model, save_dir)
                self.tools.update({"custom": CustomTool(model)})

    ``hash_weights=False`` records only a hash of the parameter names, shapes and dtypes instead of the
    weights' contents (which are hashed once per weight state and then reused: editing a parameter in
    place, e.g. an optimiser step, is noticed through its version counter).
    """

    def __init__(self, model: Any, save_dir: str | os.PathLike = "experiments", hash_weights: bool = True):
        self.model = model
        self.save_dir = Path(save_dir)
        self.tools = ToolBox(model)
        self.hash_weights = hash_weights
        self._weights_hash: tuple[tuple, str] | None = None
        self._swept: set[str] = set()  # functions whose folder was cleared of killed runs' leftovers

    # ---- decorators --------------------------------------------------------------------------------
    def use_tools(self, *names: str) -> Callable[[Callable], Callable]:
        """Decorator: call the function with each named tool as the keyword argument of that name, and
        record the call. Unknown names, or a function with no parameter of a tool's name, fail here."""
        for name in names:
            if name not in self.tools:
                raise ValueError(f"unknown tool {name!r}; available tools: {', '.join(self.tools)}")

        def decorate(fn: Callable) -> Callable:
            params = inspect.signature(fn).parameters
            takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            missing = [n for n in names if n not in params and not takes_kwargs]
            if missing:
                raise TypeError(
                    f"{fn.__name__} has no parameter named {', '.join(missing)}: use_tools passes each tool as the "
                    f"keyword argument of its name, e.g. def {fn.__name__}(..., {missing[0]}=None)"
                )

            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                clash = [n for n in names if n in kwargs]
                if clash:
                    raise TypeError(f"{fn.__name__}: do not pass {', '.join(clash)}; use_tools supplies them")
                tools = {n: self.tools[n] for n in names}
                return self._record(fn, args, kwargs, tools)

            return run

        return decorate

    def log_experiment(self, fn: Callable) -> Callable:
        """Decorator: record every call of ``fn`` (``use_tools`` with no tools; Arrakis's name)."""
        return self.use_tools()(fn)

    # ---- runs --------------------------------------------------------------------------------------
    def runs(self, name: str | None = None) -> list[dict]:
        """The records (``run.json`` contents, with ``run_id``) of every run of function ``name`` (every
        function if ``None``), oldest first. Runs still in progress are not listed; a record that cannot be
        read (truncated, corrupt) is skipped with an :class:`ExperimentRecordWarning` naming its file."""
        pattern = f"{name}/*/run.json" if name is not None else "*/*/run.json"
        records = []
        for path in sorted(self.save_dir.glob(pattern)):
            try:
                records.append(_read_record(path))
            except ValueError as e:
                warnings.warn(f"skipped: {e}", ExperimentRecordWarning, stacklevel=2)
        return sorted(records, key=lambda r: r["run_id"])

    def _run_dir(self, run_id: str) -> Path:
        found = [p.parent for p in self.save_dir.glob(f"*/{run_id}/run.json")]
        if not found:
            raise KeyError(f"no run {run_id!r} under {self.save_dir}; exp.runs() lists the recorded runs")
        return found[0]

    def load_run(self, run_id: str) -> Any:
        """The result a run returned, rebuilt from its files (tensors on the CPU). A damaged record raises
        ``ValueError`` naming the file."""
        folder = self._run_dir(run_id)
        record = _read_record(folder / "run.json")
        if record.get("status") != "ok":
            raise RuntimeError(f"run {run_id} raised {record.get('error')}; it has no result")
        tensors_file = folder / "result.safetensors"
        fix = f"restore it or delete the run's folder {folder}"
        try:
            tensors = load_file(str(tensors_file)) if tensors_file.exists() else {}
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{tensors_file} is not a readable safetensors file ({_problem(e)}): {fix}") from None
        try:
            return _decode(record["result"], tensors)
        except KeyError as e:
            raise ValueError(f"{tensors_file} lacks the tensor {_safe_str(e)} that run.json refers to: {fix}") from None
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: sparse indices out of range
            raise ValueError(f"{folder / 'run.json'} has a malformed result ({_problem(e)}): {fix}") from None

    # ---- recording ---------------------------------------------------------------------------------
    def _record(self, fn: Callable, args: tuple, kwargs: dict, tools: dict[str, Any]) -> Any:
        started = datetime.now(timezone.utc)
        bound = inspect.signature(fn).bind(*args, **kwargs, **tools)
        bound.apply_defaults()
        notes: list[str] = []
        arguments = {k: _summarise(v, k, notes) for k, v in bound.arguments.items() if k not in tools}
        if notes:
            warnings.warn(
                f"{fn.__name__}: argument {', '.join(notes)} recorded as a placeholder", ExperimentRecordWarning, 3
            )
        folder, run_id = self._new_run_dir(fn.__name__, started)
        source = _source(fn)
        record: dict[str, Any] = {
            "run_id": run_id,
            "function": fn.__name__,
            "qualname": fn.__qualname__,
            "module": fn.__module__,
            "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
            "source": source,
            "tools": sorted(tools),
            "arguments": arguments,
            "model": self.model_identity(),
            "started": started.isoformat(),
            "versions": _versions(),
        }
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs, **tools)
        except BaseException as e:
            record.update(status="error", error=_problem(e), duration_s=time.perf_counter() - t0)
            _write_record(folder, record, {})
            raise
        record.update(status="ok", duration_s=time.perf_counter() - t0)
        encoder = _Encoder()
        record["result"] = encoder.encode(result, "result")
        record["unstored"] = encoder.unstored
        if encoder.unstored:
            warnings.warn(
                f"run {run_id}: {', '.join(encoder.unstored)} could not be stored safely; recorded as type and "
                "repr only (the call still returns it)",
                ExperimentRecordWarning,
                stacklevel=3,
            )
        _write_record(folder, record, encoder.tensors)
        return result

    def _new_run_dir(self, name: str, started: datetime) -> tuple[Path, str]:
        parent = self.save_dir / name
        for path in (parent, *parent.parents):  # the save_dir itself, or a folder above it, may be the file
            if path.exists():
                if not path.is_dir():
                    what = "a folder of runs" if path == parent else f"a folder (save_dir is {self.save_dir})"
                    raise NotADirectoryError(
                        f"{path} is a file, not {what}: move it or choose another save_dir (the function did not run)"
                    )
                break
        parent.mkdir(parents=True, exist_ok=True)
        if name not in self._swept:
            _remove_killed_runs(parent)
            self._swept.add(name)
        while True:
            run_id = f"{started:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}"
            try:
                (parent / run_id).mkdir()  # exclusive: never reuses a folder, whichever process made it
            except FileExistsError:
                continue
            _writer_marker(parent / run_id).touch()
            return parent / run_id, run_id

    def model_identity(self) -> dict[str, Any]:
        """Name, family, config, parameter count and hashes of the bench's model (what ``run.json`` records).
        A part that cannot be computed (weights on the meta device, a ``to_dict`` that raises) is recorded as
        ``None`` with an :class:`ExperimentRecordWarning`; a config that is not plain JSON is summarised."""
        model = self.model
        cfg = getattr(model, "cfg", None)
        problems: list[str] = []

        def attempt(field: str, compute: Callable[[], Any]) -> Any:
            try:
                return compute()
            except Exception as e:  # a model's own methods may raise anything; the run must still happen
                problems.append(f"{field} ({_problem(e)})")
                return None

        cfg_dict = attempt("cfg", cfg.to_dict) if cfg is not None and hasattr(cfg, "to_dict") else None
        identity: dict[str, Any] = {
            "name": _summarise(getattr(model, "name", type(model).__name__), "name", problems),
            "family": _summarise(getattr(cfg, "family", None), "family", problems),
            "cfg": cfg_dict if _is_json(cfg_dict) else _summarise(cfg_dict, "cfg", problems),
        }
        if isinstance(model, torch.nn.Module):
            params = list(model.named_parameters())
            shapes = hashlib.sha256()
            for n, p in params:
                shapes.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
            identity["n_params"] = sum(p.numel() for _, p in params)
            identity["param_shapes_sha256"] = shapes.hexdigest()
            if self.hash_weights:
                identity["weights_sha256"] = attempt("weights_sha256", lambda: self._weights_sha256(params))
        if problems:
            warnings.warn(f"model identity: {', '.join(problems)}; recorded as None", ExperimentRecordWarning, 2)
        return identity

    def _weights_sha256(self, params: Sequence[tuple[str, torch.Tensor]]) -> str:
        """SHA-256 of every parameter's bytes, reused while no parameter has been replaced or edited."""
        state = tuple((n, p.data_ptr(), p._version) for n, p in params)
        if self._weights_hash is None or self._weights_hash[0] != state:
            h = hashlib.sha256()
            for n, p in params:
                h.update(n.encode())
                h.update(_tensor_bytes(p))
            self._weights_hash = (state, h.hexdigest())
        return self._weights_hash[1]


Experiment = BaseInterpretabilityBench


# ---- encoding ------------------------------------------------------------------------------------------
_COMPRESSED = {  # sparse compressed layouts: (compressed indices, plain indices) accessors
    torch.sparse_csr: ("crow_indices", "col_indices"),
    torch.sparse_bsr: ("crow_indices", "col_indices"),
    torch.sparse_csc: ("ccol_indices", "row_indices"),
    torch.sparse_bsc: ("ccol_indices", "row_indices"),
}


def _safe_str(obj: Any) -> str:
    """``str(obj)``, or a placeholder naming its type when its ``__str__`` raises."""
    try:
        return str(obj)
    except Exception as e:
        return f"<{type(obj).__qualname__} whose str raised {type(e).__name__}>"


def _repr_checked(obj: Any, limit: int) -> tuple[str, str | None]:
    """``repr(obj)`` cut to ``limit`` characters and ``None``, or, when ``__repr__`` raises, a placeholder
    naming the type and the problem."""
    try:
        text = repr(obj)
    except Exception as e:  # a user's __repr__ may raise anything; the record keeps a placeholder instead
        problem = f"repr raised {_problem(e)}"
        return f"<{_type_name(obj)} object; {problem}>", problem
    return (text if len(text) <= limit else text[:limit] + "..."), None


def _safe_repr(obj: Any, limit: int) -> str:
    """``repr(obj)`` cut to ``limit`` characters, or a placeholder naming its type when ``__repr__`` raises."""
    return _repr_checked(obj, limit)[0]


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _problem(e: BaseException) -> str:
    return f"{type(e).__name__}: {_safe_str(e)}"


def _tensor_parts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense, contiguous CPU tensors that determine ``t``: ``{"": t}`` for a strided tensor,
    ``{"indices", "values"}`` for sparse COO (coalesced), ``{"compressed", "plain", "values"}`` for
    CSR/CSC/BSR/BSC. Copies, so safetensors never sees shared storage. Raises ``ValueError`` naming the
    fix for tensors without storable data (meta, nested, quantized)."""
    t = t.detach()
    if t.is_meta:
        raise ValueError("a meta tensor has no data; return a tensor on a real device")
    if t.is_nested:
        raise ValueError("nested tensors cannot be stored; return t.unbind() (a tuple of tensors)")
    if t.is_quantized:
        raise ValueError("quantized tensors cannot be stored; return t.dequantize() or t.int_repr()")
    if t.layout == torch.sparse_coo:
        t = t.coalesce()
        parts = {"indices": t.indices(), "values": t.values()}
    elif t.layout in _COMPRESSED:
        compressed, plain = _COMPRESSED[t.layout]
        parts = {"compressed": getattr(t, compressed)(), "plain": getattr(t, plain)(), "values": t.values()}
    elif t.layout == torch.strided:
        parts = {"": t}
    else:
        raise ValueError(f"tensors of layout {t.layout} cannot be stored; return t.to_dense()")
    return {k: v.resolve_conj().resolve_neg().to("cpu", copy=True).contiguous() for k, v in parts.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a dense tensor (any dtype), without a copy when it is already a contiguous CPU tensor."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _from_numpy(value: np.ndarray) -> torch.Tensor:
    """A CPU tensor copy of a numeric array, whatever its strides (negative too) and byte order."""
    return torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="), order="C", copy=True))


@functools.cache
def _storable(dtype: torch.dtype) -> bool:
    """Whether safetensors can hold tensors of ``dtype`` (tried once per dtype on a one-element tensor)."""
    try:
        save({"x": torch.zeros(1, dtype=dtype)})
    except Exception:  # safetensors reports an unknown dtype in several ways (KeyError, ValueError, ...)
        return False
    return True


def _numeric_array(value: Any) -> bool:
    """A numpy array torch can hold (bool, integer, float or complex)."""
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


def _tensor_summary(t: torch.Tensor) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "type": "tensor",
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "device": str(t.device),
    }
    if t.layout != torch.strided:
        summary["layout"] = str(t.layout).removeprefix("torch.")
    try:
        parts = _tensor_parts(t)
    except Exception as e:  # no data to hash (meta, nested, quantized, an exotic subclass)
        summary["data"] = f"not summarised ({_problem(e)})"
        return summary
    h = hashlib.sha256()
    for part in parts.values():
        h.update(_tensor_bytes(part))
    summary["sha256"] = h.hexdigest()[:16]
    values = parts.get("values", parts.get(""))
    if values is not None and values.numel() and not values.is_complex():
        x = values.double()
        stats = {"mean": x.mean(), "std": x.std() if x.numel() > 1 else x.new_zeros(()), "min": x.min(), "max": x.max()}
        summary.update({k: _json_float(float(v)) for k, v in stats.items()})
    return summary


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _summarise(value: Any, path: str, notes: list[str], depth: int = 0, open_ids: frozenset[int] = frozenset()) -> Any:
    """A JSON description of an argument: tensors and arrays summarised, plain values kept, others repr'd.
    Never raises: a value that cannot be described (its ``repr`` raises, it contains itself, it nests deeper
    than ``_MAX_DEPTH``) becomes a placeholder, and ``path`` plus the reason is appended to ``notes``."""
    try:
        if isinstance(value, list | tuple | dict):
            if id(value) in open_ids:
                notes.append(f"{path} (contains itself)")
                return {"type": _type_name(value), "repr": "<contains itself>"}
            if depth >= _MAX_DEPTH:
                notes.append(f"{path} (nested deeper than {_MAX_DEPTH} levels)")
                return {"type": _type_name(value), "repr": f"<nested deeper than {_MAX_DEPTH} levels>"}
            inner = open_ids | {id(value)}
            if isinstance(value, dict):
                return {
                    _safe_str(k): _summarise(v, f"{path}[{_safe_repr(k, 40)}]", notes, depth + 1, inner)
                    for k, v in value.items()
                }
            if len(value) > _MAX_ITEMS:
                first = [_summarise(v, f"{path}[{i}]", notes, depth + 1, inner) for i, v in enumerate(value[:10])]
                return {"type": type(value).__name__, "len": len(value), "first": first}
            return [_summarise(v, f"{path}[{i}]", notes, depth + 1, inner) for i, v in enumerate(value)]
        if _numeric_array(value):
            try:
                return {**_tensor_summary(_from_numpy(value)), "type": "ndarray"}
            except (TypeError, ValueError):  # e.g. float128: no torch dtype; described by its repr below
                pass
        elif isinstance(value, torch.Tensor):
            return _tensor_summary(value)
        elif isinstance(value, float):
            return _json_float(value)
        elif value is None or isinstance(value, bool | int | str):
            return value
        elif isinstance(value, np.generic):
            return _summarise(value.item(), path, notes, depth, open_ids)
        text, problem = _repr_checked(value, _MAX_REPR)
    except Exception as e:  # a user's object misbehaving (__len__, items(), ...): a placeholder, not a lost run
        problem = _problem(e)
        text = f"<not described: {problem}>"
    if problem is not None:
        notes.append(f"{path} ({problem})")
    return {"type": _type_name(value), "repr": text}


class _Encoder:
    """Encodes a result as JSON, tensors moved to :attr:`tensors` (keyed by their path) and referenced by key.

    Never raises: a part that cannot be stored safely (an arbitrary object, a meta or quantized tensor, a
    container holding itself, nesting deeper than ``_MAX_DEPTH``) is recorded as its type and repr, and its
    path plus the reason is appended to :attr:`unstored`; the rest is stored.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.unstored: list[str] = []
        self._open: set[int] = set()

    def encode(self, value: Any, path: str, depth: int = 0) -> Any:
        try:
            return self._encode(value, path, depth)
        except Exception as e:  # whatever a value's own methods raise: this part unstored, the rest kept
            return self._unstored(value, path, _problem(e))

    def _unstored(self, value: Any, path: str, reason: str) -> dict[str, Any]:
        self.unstored.append(f"{path} ({type(value).__name__}: {reason})")
        return {_TAG: "unstored", "type": _type_name(value), "repr": _safe_repr(value, _MAX_UNSTORED_REPR)}

    def _key(self, path: str) -> str:
        while path in self.tensors:
            path += "'"
        return path

    def _store(self, t: torch.Tensor, path: str) -> str:
        if not _storable(t.dtype):
            raise ValueError(f"safetensors cannot hold dtype {t.dtype}; convert it, e.g. t.float()")
        key = self._key(path)
        self.tensors[key] = t
        return key

    def _tensor(self, value: torch.Tensor, path: str) -> dict[str, Any]:
        parts = _tensor_parts(value)
        if value.layout == torch.strided:
            return {_TAG: "tensor", "key": self._store(parts[""], path)}
        keys = {name: self._store(part, f"{path}.{name}") for name, part in parts.items()}
        layout = str(value.layout).removeprefix("torch.")
        return {_TAG: "sparse", "layout": layout, "size": list(value.shape), **keys}

    def _encode(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if _numeric_array(value):
            return {_TAG: "ndarray", "key": self._store(_from_numpy(value), path)}
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {_TAG: "float", "value": str(value)}
        if isinstance(value, np.generic):
            return self._encode(value.item(), path, depth)
        if not isinstance(value, tuple | list | dict):
            return self._unstored(value, path, "not a tensor, array, number, string or container of those")
        if id(value) in self._open:
            return self._unstored(value, path, "it contains itself")
        if depth >= _MAX_DEPTH:
            return self._unstored(value, path, f"nested deeper than {_MAX_DEPTH} levels")
        self._open.add(id(value))
        try:
            return self._container(value, path, depth + 1)
        finally:
            self._open.discard(id(value))

    def _container(self, value: tuple | list | dict, path: str, depth: int) -> Any:
        if isinstance(value, tuple | list):
            items = [self.encode(v, f"{path}.{i}", depth) for i, v in enumerate(value)]
            return {_TAG: "tuple", "items": items} if isinstance(value, tuple) else items
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: self.encode(v, f"{path}.{k}", depth) for k, v in value.items()}
        items = [
            [self.encode(k, f"{path}.key{i}", depth), self.encode(v, f"{path}.{_safe_str(k)}", depth)]
            for i, (k, v) in enumerate(value.items())
        ]
        return {_TAG: "dict", "items": items}


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    kind = node.get(_TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if kind == "tensor":
        return tensors[node["key"]]
    if kind == "sparse":
        layout = getattr(torch, node["layout"])
        if layout == torch.sparse_coo:
            indices, values = tensors[node["indices"]], tensors[node["values"]]
            return torch.sparse_coo_tensor(indices, values, node["size"], check_invariants=True).coalesce()
        compressed, plain, values = (tensors[node[k]] for k in ("compressed", "plain", "values"))
        return torch.sparse_compressed_tensor(
            compressed, plain, values, node["size"], layout=layout, check_invariants=True
        )  # invariants checked: damaged indices raise here instead of crashing later
    if kind == "ndarray":
        return tensors[node["key"]].numpy()
    if kind == "float":
        return float(node["value"])
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in node["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["items"]}
    if kind == "unstored":
        return UnstoredValue(node["type"], node["repr"])
    raise ValueError(f"unknown entry kind {kind!r}")


# ---- small helpers -------------------------------------------------------------------------------------
def _source(fn: Callable) -> str:
    """The function's source, or (defined interactively) a description of its bytecode."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        digest = hashlib.sha256(code.co_code).hexdigest() if code is not None else "unknown"
        return f"<source unavailable; bytecode sha256 {digest}>"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("mechscope", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _write_record(folder: Path, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``result.safetensors`` (if there are tensors) and then ``run.json``, each atomically, so a run
    is listed only once complete and a kill never leaves a partial file. A failure to write (disk full, a
    folder removed) is reported as an :class:`ExperimentRecordWarning`, never raised: the caller still
    returns the result, or re-raises the function's own exception."""
    try:
        text = json.dumps(record, indent=1, allow_nan=False)
        if tensors:
            atomic_write(folder / "result.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_text(folder / "run.json", text)
        _writer_marker(folder).unlink(missing_ok=True)
    except Exception as e:
        warnings.warn(
            f"run {record['run_id']} could not be recorded in {folder} ({_problem(e)}); the call's outcome is "
            "returned or raised as usual, but the run is not listed",
            ExperimentRecordWarning,
            stacklevel=4,
        )


def _writer_marker(folder: Path) -> Path:
    """The empty file that says which process is recording the run in ``folder`` (removed once it is recorded)."""
    return folder / f".writer-{socket.gethostname()}-{os.getpid()}"


def _remove_killed_runs(parent: Path) -> list[Path]:
    """Remove the run folders under ``parent`` whose writer, a process of this host, died before it recorded
    the run (killed, or its record could not be written): a kill leaves no litter behind for long."""
    removed = []
    for marker in parent.glob("*/.writer-*"):
        host, _, pid = marker.name.removeprefix(".writer-").rpartition("-")
        if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        if (marker.parent / "run.json").exists():  # killed just after recording: only the marker is left over
            marker.unlink(missing_ok=True)
        else:
            shutil.rmtree(marker.parent, ignore_errors=True)
            removed.append(marker.parent)
    return removed


def _read_record(path: Path) -> dict[str, Any]:
    """A ``run.json``'s contents; ``ValueError`` naming the file and the fix when it is unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        problem = _problem(e)
    else:
        if isinstance(record, dict) and isinstance(record.get("run_id"), str):
            return record
        problem = "not a run record (no run_id)"
    raise ValueError(f"{path} is not a readable run record ({problem}); restore it or delete its folder {path.parent}")
