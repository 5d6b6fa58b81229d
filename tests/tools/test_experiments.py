"""The tool registry and the experiment bench: tool injection, run records, results read back."""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechscope import tools
from mechscope.tools import BaseInterpretabilityTool, available_tools, get_tool_class, register_tool
from mechscope.tools.experiments import BaseInterpretabilityBench, Experiment, UnstoredValue


class LayerCounter(BaseInterpretabilityTool):
    def count(self) -> int:
        return self.model.cfg.n_layers


@pytest.fixture
def clean_registry(monkeypatch):
    """Tools registered in a test are gone after it."""
    monkeypatch.setattr(tools, "_REGISTRY", dict(tools._REGISTRY))


@pytest.fixture
def exp(llama, tmp_path):
    return Experiment(llama, save_dir=tmp_path / "runs")


# ---- registry --------------------------------------------------------------------------------------
def test_builtin_tools_are_registered_by_path_and_resolve_on_use():
    assert {"superposition", "residual", "svd"} <= set(available_tools())
    assert tools._REGISTRY["svd"] == "mechscope.tools.svd.SVDInterpreter"  # a string: nothing imported yet
    from mechscope.tools.residual import ResidualTools

    assert get_tool_class("residual") is ResidualTools


def test_register_tool_as_call_and_decorator(clean_registry):
    register_tool("counter", LayerCounter)
    assert get_tool_class("counter") is LayerCounter

    @register_tool("counter2")
    class Counter2(LayerCounter):
        pass

    assert get_tool_class("counter2") is Counter2
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        register_tool("counter", Counter2)
    register_tool("counter", Counter2, overwrite=True)
    assert get_tool_class("counter") is Counter2
    with pytest.raises(ValueError, match="must be a Python identifier"):
        register_tool("my-tool", LayerCounter)


def test_registry_errors_name_the_fix(clean_registry):
    with pytest.raises(KeyError, match=r"no tool named 'nope'; registered tools: .*residual"):
        get_tool_class("nope")
    register_tool("ghost", "mechscope.tools.not_written_yet.Ghost")
    with pytest.raises(ImportError, match=r"tool 'ghost' is registered as mechscope\.tools\.not_written_yet\.Ghost"):
        get_tool_class("ghost")


# ---- use_tools -------------------------------------------------------------------------------------
def test_use_tools_injects_one_instance_per_bench(exp, clean_registry):
    register_tool("counter", LayerCounter)
    seen = []

    @exp.use_tools("counter", "residual")
    def f(x, counter=None, residual=None):
        seen.append((counter, residual))
        return counter.count() + x

    assert f(10) == 10 + exp.model.cfg.n_layers
    f(1)
    (c1, r1), (c2, r2) = seen
    assert c1 is c2 and r1 is r2 and c1.model is exp.model
    assert type(r1).__name__ == "ResidualTools"
    with pytest.raises(TypeError, match="use_tools supplies them"):
        f(1, counter=None)


def test_unknown_tools_and_missing_parameters_fail_at_decoration(exp):
    with pytest.raises(ValueError, match=r"unknown tool 'nope'; available tools: .*residual.*superposition"):
        exp.use_tools("nope")
    with pytest.raises(TypeError, match=r"no parameter named residual.*def g\(\.\.\., residual=None\)"):

        @exp.use_tools("residual")
        def g(x):
            return x

    @exp.use_tools("residual")
    def h(x, **kwargs):  # **kwargs receives the tool
        return type(kwargs["residual"]).__name__

    assert h(1) == "ResidualTools"


def test_arrakis_style_subclass_adds_its_own_tool(llama, tmp_path):
    class MIExperiment(BaseInterpretabilityBench):
        def __init__(self, model, save_dir="experiments"):
            super().__init__(model, save_dir)
            self.tools.update({"custom": LayerCounter(model)})

    exp = MIExperiment(llama, save_dir=tmp_path)
    assert "custom" in exp.tools and "custom" not in available_tools()

    @exp.use_tools("custom")
    def test_custom_function(custom):
        return custom.count()

    assert test_custom_function() == llama.cfg.n_layers
    assert exp.load_run(exp.runs("test_custom_function")[0]["run_id"]) == llama.cfg.n_layers


# ---- records ---------------------------------------------------------------------------------------
def test_every_call_is_a_new_run_with_arguments_source_and_model(exp):
    @exp.log_experiment
    def scale(t, factor=2.0):
        return t * factor

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for _ in range(3):  # three calls within the same second
        scale(t)
    runs = exp.runs("scale")
    assert len(runs) == 3 and len({r["run_id"] for r in runs}) == 3
    rec = runs[0]
    assert rec["function"] == "scale" and rec["status"] == "ok" and rec["tools"] == []
    assert rec["source_sha256"] == hashlib.sha256(inspect.getsource(scale.__wrapped__).encode()).hexdigest()
    arg = rec["arguments"]["t"]
    assert arg["shape"] == [2, 3] and arg["dtype"] == "float32"
    assert arg["sha256"] == hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(values) / 6
    std = (sum((v - mean) ** 2 for v in values) / 5) ** 0.5
    assert (arg["mean"], arg["min"], arg["max"]) == (2.5, 0.0, 5.0)
    assert arg["std"] == pytest.approx(std)
    assert rec["arguments"]["factor"] == 2.0  # defaults are recorded too
    model = rec["model"]
    assert model["name"] == exp.model.name and model["family"] == "llama"
    assert model["cfg"] == exp.model.cfg.to_dict()
    assert model["n_params"] == sum(p.numel() for p in exp.model.parameters())
    for r in runs:
        assert torch.equal(exp.load_run(r["run_id"]), t * 2)
    stored = load_file(str(exp.save_dir / "scale" / rec["run_id"] / "result.safetensors"))
    assert list(stored) == ["result"]


def test_weights_hash_follows_the_weights(gpt2, tmp_path):
    exp = Experiment(gpt2, save_dir=tmp_path)
    expected = hashlib.sha256()
    for n, p in gpt2.named_parameters():
        expected.update(n.encode())
        expected.update(p.detach().numpy().tobytes())
    first = exp.model_identity()
    assert first["weights_sha256"] == expected.hexdigest()
    p = next(gpt2.parameters())
    with torch.no_grad():
        p[0, 0] += 1.0
    try:
        second = exp.model_identity()
    finally:
        with torch.no_grad():
            p[0, 0] -= 1.0
    assert second["weights_sha256"] != first["weights_sha256"]
    assert second["param_shapes_sha256"] == first["param_shapes_sha256"]
    assert "weights_sha256" not in Experiment(gpt2, save_dir=tmp_path, hash_weights=False).model_identity()


def test_results_of_every_kind_round_trip(exp):
    base = torch.ones(3)

    @exp.log_experiment
    def everything():
        return {
            "tensor": torch.arange(4),
            "shared": (base, base[1:]),  # views of one storage
            "array": np.eye(2, dtype=np.float32),
            "by_layer": {0: torch.zeros(2), 1: 1.5},
            "floats": [float("nan"), float("inf"), np.float64(0.25)],
            "nested": {"s": "text", "n": None, "b": True},
            "object": object,
        }

    with pytest.warns(UserWarning, match=r"result\.object \(type: not a tensor.*could not be stored safely"):
        original = everything()
    back = exp.load_run(exp.runs("everything")[0]["run_id"])
    assert torch.equal(back["tensor"], original["tensor"])
    assert isinstance(back["shared"], tuple) and torch.equal(back["shared"][1], torch.ones(2))
    assert isinstance(back["array"], np.ndarray) and np.array_equal(back["array"], np.eye(2))
    assert set(back["by_layer"]) == {0, 1} and back["by_layer"][1] == 1.5
    assert torch.equal(back["by_layer"][0], torch.zeros(2))
    assert np.isnan(back["floats"][0]) and back["floats"][1] == float("inf") and back["floats"][2] == 0.25
    assert back["nested"] == {"s": "text", "n": None, "b": True}
    assert back["object"] == UnstoredValue("builtins.type", repr(object))


def test_a_failing_run_is_recorded_and_reraised(exp):
    @exp.log_experiment
    def broken(x):
        raise RuntimeError(f"bad {x}")

    with pytest.raises(RuntimeError, match="bad 3"):
        broken(3)
    (rec,) = exp.runs("broken")
    assert rec["status"] == "error" and rec["error"] == "RuntimeError: bad 3"
    with pytest.raises(RuntimeError, match="raised RuntimeError: bad 3; it has no result"):
        exp.load_run(rec["run_id"])
    with pytest.raises(KeyError, match=r"exp\.runs\(\) lists the recorded runs"):
        exp.load_run("20000101T000000.000000Z-deadbeef")


def _record_many(save_dir: str, n: int) -> None:
    exp = Experiment(object(), save_dir=save_dir)
    f = exp.log_experiment(_plain)
    for i in range(n):
        f(i)


def _plain(i):
    return i * i


def test_run_ids_are_unique_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the children only write JSON: no torch work after the fork
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), 25)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    exp = Experiment(object(), save_dir=tmp_path)
    runs = exp.runs("_plain")
    assert len(runs) == 50 and len({r["run_id"] for r in runs}) == 50
    assert sorted(exp.load_run(r["run_id"]) for r in runs) == sorted(2 * [i * i for i in range(25)])
    assert json.loads((tmp_path / "_plain" / runs[0]["run_id"] / "run.json").read_text())["model"]["name"] == "object"
