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
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mechscope.files import atomic_write
from mechscope.tools import available_tools, get_tool_class

_TAG = "__mechscope__"  # key marking an encoded (non-plain-JSON) value in result.json
_MAX_ITEMS = 100  # items of a list argument summarised one by one; longer lists are abbreviated
_MAX_REPR = 500


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
        function if ``None``), oldest first. Runs still in progress are not listed."""
        pattern = f"{name}/*/run.json" if name is not None else "*/*/run.json"
        records = [json.loads(p.read_text()) for p in self.save_dir.glob(pattern)]
        return sorted(records, key=lambda r: r["run_id"])

    def _run_dir(self, run_id: str) -> Path:
        found = [p.parent for p in self.save_dir.glob(f"*/{run_id}/run.json")]
        if not found:
            raise KeyError(f"no run {run_id!r} under {self.save_dir}; exp.runs() lists the recorded runs")
        return found[0]

    def load_run(self, run_id: str) -> Any:
        """The result a run returned, rebuilt from its files (tensors on the CPU)."""
        folder = self._run_dir(run_id)
        record = json.loads((folder / "run.json").read_text())
        if record["status"] != "ok":
            raise RuntimeError(f"run {run_id} raised {record['error']}; it has no result")
        tensors_file = folder / "result.safetensors"
        tensors = load_file(str(tensors_file)) if tensors_file.exists() else {}
        return _decode(record["result"], tensors)

    # ---- recording ---------------------------------------------------------------------------------
    def _record(self, fn: Callable, args: tuple, kwargs: dict, tools: dict[str, Any]) -> Any:
        started = datetime.now(timezone.utc)
        bound = inspect.signature(fn).bind(*args, **kwargs, **tools)
        bound.apply_defaults()
        arguments = {k: _summarise(v) for k, v in bound.arguments.items() if k not in tools}
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
            record.update(status="error", error=f"{type(e).__name__}: {e}", duration_s=time.perf_counter() - t0)
            _write_json(folder / "run.json", record)
            raise
        record.update(status="ok", duration_s=time.perf_counter() - t0)
        tensors: dict[str, torch.Tensor] = {}
        unstored: list[str] = []
        record["result"] = _encode(result, "result", tensors, unstored)
        if unstored:
            warnings.warn(
                f"run {run_id}: {', '.join(unstored)} could not be stored safely (not a tensor, array, number, "
                "string or container of those); recorded as type and repr only",
                stacklevel=3,
            )
        if tensors:
            save_file(tensors, str(folder / "result.safetensors"))
        _write_json(folder / "run.json", record)  # written last: a run is listed once it is complete
        return result

    def _new_run_dir(self, name: str, started: datetime) -> tuple[Path, str]:
        parent = self.save_dir / name
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            run_id = f"{started:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}"
            try:
                (parent / run_id).mkdir()  # exclusive: never reuses a folder, whichever process made it
                return parent / run_id, run_id
            except FileExistsError:
                continue

    def model_identity(self) -> dict[str, Any]:
        """Name, family, config, parameter count and hashes of the bench's model (what ``run.json`` records)."""
        model = self.model
        cfg = getattr(model, "cfg", None)
        identity: dict[str, Any] = {
            "name": getattr(model, "name", type(model).__name__),
            "family": getattr(cfg, "family", None),
            "cfg": cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None,
        }
        if isinstance(model, torch.nn.Module):
            params = list(model.named_parameters())
            shapes = hashlib.sha256()
            for n, p in params:
                shapes.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
            identity["n_params"] = sum(p.numel() for _, p in params)
            identity["param_shapes_sha256"] = shapes.hexdigest()
            if self.hash_weights:
                identity["weights_sha256"] = self._weights_sha256(params)
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
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype), without a copy when it is already a contiguous CPU tensor."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _numeric_array(value: Any) -> bool:
    """A numpy array torch can hold (bool, integer, float or complex)."""
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


def _tensor_summary(t: torch.Tensor) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "type": "tensor",
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "device": str(t.device),
        "sha256": hashlib.sha256(_tensor_bytes(t)).hexdigest()[:16],
    }
    if t.numel() and not t.is_complex():
        x = t.detach().double()
        stats = {"mean": x.mean(), "std": x.std() if t.numel() > 1 else x.new_zeros(()), "min": x.min(), "max": x.max()}
        summary.update({k: _json_float(float(v)) for k, v in stats.items()})
    return summary


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _summarise(value: Any) -> Any:
    """A JSON description of an argument: tensors and arrays summarised, plain values kept, others repr'd."""
    if _numeric_array(value):
        return {**_tensor_summary(torch.from_numpy(value)), "type": "ndarray"}
    if isinstance(value, torch.Tensor):
        return _tensor_summary(value)
    if isinstance(value, float):
        return _json_float(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, np.generic):
        return _summarise(value.item())
    if isinstance(value, list | tuple):
        if len(value) > _MAX_ITEMS:
            return {"type": type(value).__name__, "len": len(value), "first": [_summarise(v) for v in value[:10]]}
        return [_summarise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _summarise(v) for k, v in value.items()}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)[:_MAX_REPR]}


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], unstored: list[str]) -> Any:
    """JSON for ``value``: tensors go to ``tensors`` (keyed by their path) and are referenced by key."""
    if isinstance(value, torch.Tensor) or _numeric_array(value):
        key = path
        while key in tensors:
            key += "'"
        t = torch.from_numpy(value) if isinstance(value, np.ndarray) else value.detach()
        tensors[key] = t.to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage
        return {_TAG: "ndarray" if isinstance(value, np.ndarray) else "tensor", "key": key}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "value": str(value)}
    if isinstance(value, np.generic):
        return _encode(value.item(), path, tensors, unstored)
    if isinstance(value, tuple | list):
        items = [_encode(v, f"{path}.{i}", tensors, unstored) for i, v in enumerate(value)]
        return {_TAG: "tuple", "items": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, f"{path}.{k}", tensors, unstored) for k, v in value.items()}
        items = [
            [_encode(k, f"{path}.key{i}", tensors, unstored), _encode(v, f"{path}.{k}", tensors, unstored)]
            for i, (k, v) in enumerate(value.items())
        ]
        return {_TAG: "dict", "items": items}
    unstored.append(f"{path} ({type(value).__name__})")
    return {_TAG: "unstored", "type": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)}


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
    if kind == "ndarray":
        return tensors[node["key"]].numpy()
    if kind == "float":
        return float(node["value"])
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in node["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["items"]}
    return UnstoredValue(node["type"], node["repr"])


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


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, allow_nan=False)))
