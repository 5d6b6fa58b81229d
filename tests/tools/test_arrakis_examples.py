"""Acceptance: the usage examples of Arrakis's superposition and residual-tools docs run unchanged.

The examples are quoted from the Arrakis repository (github.com/yash-srivastava19/arrakis):
``docs/SuperpositionDisentangler.md`` and ``docs/_build/html/_sources/ResidualTools.md`` (the residual page
exists only as the built Sphinx source there). Only the import lines differ. Each example runs as a
script from a temporary directory (its bench writes to ``./experiments``); then its stored results are
checked against computations done directly on the Hugging Face model, with no mechscope hook.
"""

from __future__ import annotations

import runpy

import numpy as np
import pytest
import torch

IMPORTS = """\
# imports to run this example
import torch
from mechscope import HookedAutoConfig, HookedAutoModel
from mechscope.tools.experiments import BaseInterpretabilityBench
"""

SUPERPOSITION_EXAMPLE = """
config = HookedAutoConfig(name="llama") # keep default values for other args
model = HookedAutoModel(config)

input_ids = torch.randint(0, 50256, (1, 50)) # generate some random tokens(replace with your ids)

# Derive from BaseInterpretabilityBench
class MIExperiment(BaseInterpretabilityBench):
   def __init__(self, model, save_dir="experiments"):
      super().__init__(model, save_dir)

exp = MIExperiment(model) # create an `exp` object.

@exp.use_tools("superposition") # the tool name to be used.
def test_superposition_disentangler(input_ids, layer_idx, superposition): # same as tool name, extra arg is passed.
   act_covariance = superposition.compute_activation_covariance([input_ids], layer_idx)
   dis_supoerpos = superposition.disentangle_superposition(act_covariance)
   return {
      "act_covariance": act_covariance,
      "dis_supoerpos": dis_supoerpos
   }

# Driver code, call the function based on whatever arguments you want!
test_superposition_disentangler(input_ids, 'layers.0.self_attn.hook_result_post') # one such example. Change as needed!
"""

RESIDUAL_EXAMPLE = """
config = HookedAutoConfig(name="llama") # keep default values for other args
model = HookedAutoModel(config)

input_ids = torch.randint(0, 50256, (1, 50)) # generate some random tokens(replace with your ids)

# Derive from BaseInterpretabilityBench
class MIExperiment(BaseInterpretabilityBench):
   def __init__(self, model, save_dir="experiments"):
      super().__init__(model, save_dir)

exp = MIExperiment(model) # create an `exp` object.

@exp.use_tools("residual") # the tool name to be used.
def test_residual_tools(layer_idx, residual): # same as tool name, extra arg is used.
   rd = residual.residual_decomposition(input_ids, layer_idx)
   rm = residual.residual_movement(input_ids, 0, 1)
   fa = residual.feature_attribution(input_ids, 0)
   return {
      "residual_decomposition": rd,
      "residual_movement": rm,
      "feature_attribution": fa
   }

# Driver code, call the function based on whatever arguments you want!
test_residual_tools(0) # one such example. Change as needed!
"""


def _run_example(source: str, tmp_path, monkeypatch) -> dict:
    script = tmp_path / "example.py"
    script.write_text(IMPORTS + source)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return runpy.run_path(str(script))


def test_superposition_example(tmp_path, monkeypatch):
    g = _run_example(SUPERPOSITION_EXAMPLE, tmp_path, monkeypatch)
    exp, model, input_ids = g["exp"], g["model"], g["input_ids"]
    (run,) = exp.runs("test_superposition_disentangler")
    assert (tmp_path / "experiments" / "test_superposition_disentangler" / run["run_id"] / "run.json").exists()
    assert run["arguments"]["layer_idx"] == "layers.0.self_attn.hook_result_post"
    result = exp.load_run(run["run_id"])

    captured = []  # the attention module's output, read with a plain PyTorch hook
    attn = model.model.model.layers[0].self_attn
    handle = attn.register_forward_hook(lambda m, a, out: captured.append(out[0].detach()))
    with torch.no_grad():
        model.model(input_ids=input_ids)
    handle.remove()
    x = captured[0][0].double()  # [50, 64]
    centred = x - x.mean(0)
    cov = centred.T @ centred / (x.shape[0] - 1)
    torch.testing.assert_close(result["act_covariance"].double(), cov, atol=1e-6, rtol=1e-4)

    concepts = result["dis_supoerpos"].double()
    assert concepts.shape == (64, 10)
    eigenvalues = np.sort(np.linalg.eigvalsh(cov.numpy()))[::-1][:10]
    torch.testing.assert_close(concepts.norm(dim=0), torch.ones(10, dtype=torch.float64))
    rayleigh = ((cov @ concepts) * concepts).sum(0)  # the variance along each direction, descending
    np.testing.assert_allclose(rayleigh.numpy(), eigenvalues, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(cov @ concepts, concepts * rayleigh, atol=1e-6, rtol=1e-3)

    again = g["test_superposition_disentangler"](input_ids, "layers.0.self_attn.hook_result_post")
    assert torch.equal(again["dis_supoerpos"], result["dis_supoerpos"])
    assert len(exp.runs("test_superposition_disentangler")) == 2  # a second run, the first kept


def test_residual_example(tmp_path, monkeypatch):
    g = _run_example(RESIDUAL_EXAMPLE, tmp_path, monkeypatch)
    exp, model, input_ids = g["exp"], g["model"], g["input_ids"]
    (run,) = exp.runs("test_residual_tools")
    assert run["arguments"] == {"layer_idx": 0}
    result = exp.load_run(run["run_id"])

    hf = model.model
    with torch.no_grad():
        out = hf(input_ids=input_ids, output_hidden_states=True)
    embed, after_block0 = out.hidden_states[0], out.hidden_states[1]  # residual before blocks 0 and 1

    rd = result["residual_decomposition"]
    assert list(rd) == ["embed"]  # layer 0: the residual is the embedding alone
    torch.testing.assert_close(rd["embed"], embed)

    rm = result["residual_movement"]
    n0, n1 = embed.norm(dim=-1), after_block0.norm(dim=-1)
    torch.testing.assert_close(rm["norm_change"], n1 - n0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm["relative_change"], (after_block0 - embed).norm(dim=-1) / n0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm["cosine"], ((embed * after_block0).sum(-1) / (n0 * n1)), atol=1e-5, rtol=1e-5)

    fa = result["feature_attribution"]
    logit = out.logits[0, -1, 0]
    torch.testing.assert_close(fa["logit"], logit.reshape(1))
    assert fa["grad_x_input"].shape == fa["integrated_gradients"].shape == (1, 50)
    gap = float(logit - fa["baseline_logit"][0])
    assert abs(float(fa["ig_completeness_error"][0])) < 1e-3 * abs(gap)
    assert float(fa["integrated_gradients"].sum()) == pytest.approx(gap, rel=1e-3)
    dla = fa["direct_logit_attribution"]
    assert list(dla) == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out", "bias"]
    torch.testing.assert_close(sum(dla.values()), logit.reshape(1), atol=1e-5, rtol=1e-5)
