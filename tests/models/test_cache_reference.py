"""ActivationCache against TransformerLens 3.x's, on the same weights and tokens.

One subprocess in the reference Python (``$MECHSCOPE_REFERENCE_PYTHON``, default ``.venv-saelens/bin/python``
at the repository root, which ``bash run.sh test`` provides) computes every TransformerLens value
(tests/models/cache_reference.py); each case below makes the same calls on mechscope's cache and compares
tensors and labels. Families: GPT-2 (LayerNorm, learned positions, biases) and Llama (RMSNorm, rotary,
grouped-query attention).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_pair
from tests.models.cache_reference import evaluate

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["gpt2", "gpt_neox", "llama", "phi3"]
N_LAYERS, D_MODEL, D_MLP = 2, 64, 256  # the tiny models of both families (checked in the fixture)


def reference_python() -> str:
    python = os.environ.get("MECHSCOPE_REFERENCE_PYTHON") or str(ROOT / ".venv-saelens" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(
            f"no reference Python at {python}: these tests compare with TransformerLens 3.x in a side venv. "
            "`bash run.sh test` creates it; or point MECHSCOPE_REFERENCE_PYTHON at a python with "
            "transformer_lens<4 installed"
        )
    return python


def c(method: str, **kwargs) -> list:
    return [method, kwargs]


def t(name: str) -> dict:
    return {"tensor": name}


def tup(*values) -> dict:
    return {"tuple": list(values)}


def nested(method: str, **kwargs) -> dict:
    return {"call": c(method, **kwargs)}


# every case: a list of calls on one cache; the last one's value (and labels) is compared
CASES: dict[str, list] = {
    # cache["name", layer] with a negative layer
    "getitem_negative": [c("__getitem__", key=tup("resid_post", -1))],
    "stack_activation_all": [c("stack_activation", activation_name="resid_post", layer=-1)],
    "stack_activation_scale_ln2": [c("stack_activation", activation_name="scale", layer=1, sublayer_type="ln2")],
    # accumulated_resid: layer -1 / None / n_layers, incl_mid, mlp_input, pos_slice, apply_ln (recomputed at the end)
    "acc_none": [c("accumulated_resid", return_labels=True)],
    "acc_minus1_mid_last_pos": [c("accumulated_resid", layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)],
    "acc_n_apply_ln": [c("accumulated_resid", layer=N_LAYERS, apply_ln=True, return_labels=True)],
    "acc_minus1_apply_ln_mid_pos": [
        c("accumulated_resid", layer=-1, incl_mid=True, apply_ln=True, pos_slice=tup(1, 5), return_labels=True)
    ],
    "acc_1_apply_ln_mid": [c("accumulated_resid", layer=1, incl_mid=True, apply_ln=True, return_labels=True)],
    "acc_1_mlp_input_apply_ln": [
        c("accumulated_resid", layer=1, mlp_input=True, apply_ln=True, pos_slice=[0, 2, 5], return_labels=True)
    ],
    "acc_0": [c("accumulated_resid", layer=0, return_labels=True)],
    "acc_slice_object": [c("accumulated_resid", layer=1, pos_slice={"slice": [0, None, 2]})],
    # decompose_resid
    "dec_minus1_last_pos": [c("decompose_resid", layer=-1, pos_slice=-1, return_labels=True)],
    "dec_none_apply_ln": [c("decompose_resid", apply_ln=True, return_labels=True)],
    "dec_1_mlp_input_apply_ln": [
        c("decompose_resid", layer=1, mlp_input=True, apply_ln=True, pos_slice=-1, return_labels=True)
    ],
    "dec_attn": [c("decompose_resid", layer=1, mode="attn", return_labels=True)],
    "dec_mlp_no_embeds": [c("decompose_resid", layer=-1, mode="mlp", incl_embeds=False, return_labels=True)],
    "dec_0_apply_ln": [c("decompose_resid", layer=0, apply_ln=True, return_labels=True)],
    # apply_ln_to_stack
    "ln_final_cached": [c("apply_ln_to_stack", residual_stack=nested("decompose_resid", layer=-1), layer=-1)],
    "ln_final_recompute": [
        c("apply_ln_to_stack", residual_stack=nested("accumulated_resid", layer=None), layer=None, recompute_ln=True)
    ],
    "ln_batch_slice": [
        c(
            "apply_ln_to_stack",
            residual_stack=nested("decompose_resid", pos_slice=-1),
            layer=-1,
            pos_slice=-1,
            batch_slice=[1],
        )
    ],
    "ln_1_mlp_input": [
        c(
            "apply_ln_to_stack",
            residual_stack=nested("accumulated_resid", layer=1, mlp_input=True),
            layer=1,
            mlp_input=True,
        )
    ],
    # heads
    "head_result_all_layers": [c("compute_head_results"), c("stack_activation", activation_name="result")],
    "heads_minus1_last_pos": [c("stack_head_results", layer=-1, pos_slice=-1, return_labels=True)],
    "heads_1_remainder_apply_ln": [
        c("stack_head_results", layer=1, incl_remainder=True, apply_ln=True, return_labels=True)
    ],
    "heads_none_remainder_pos": [
        c("stack_head_results", layer=None, incl_remainder=True, pos_slice=tup(1, 4), return_labels=True)
    ],
    "heads_0": [c("stack_head_results", layer=0, return_labels=True)],
    # neurons
    "neuron_results_1": [c("get_neuron_results", layer=1, neuron_slice=tup(0, 10), pos_slice=-1)],
    "neuron_results_0_project1": [c("get_neuron_results", layer=0, project_output_onto=t("proj1"))],
    "neuron_results_int": [c("get_neuron_results", layer=1, neuron_slice=5)],
    "neurons_2_last_pos": [
        c("stack_neuron_results", layer=2, pos_slice=-1, neuron_slice=tup(0, 8), return_labels=True)
    ],
    "neurons_1_remainder_apply_ln": [
        c("stack_neuron_results", layer=1, neuron_slice=[3, 5], incl_remainder=True, apply_ln=True, return_labels=True)
    ],
    "neurons_minus1": [c("stack_neuron_results", layer=-1, neuron_slice=tup(0, 4), return_labels=True)],
    "neurons_project2_apply_ln": [
        c(
            "stack_neuron_results",
            layer=2,
            neuron_slice=tup(0, 16),
            pos_slice=-1,
            apply_ln=True,
            project_output_onto=t("proj2"),
            return_labels=True,
        )
    ],
    "neurons_project1_remainder_apply_ln": [
        c("stack_neuron_results", layer=2, incl_remainder=True, apply_ln=True, project_output_onto=t("proj1"))
    ],
    "neurons_project2_remainder": [
        c("stack_neuron_results", layer=1, incl_remainder=True, project_output_onto=t("proj2"), pos_slice=-1)
    ],
    # the full decomposition
    "full_none_last_pos": [c("get_full_resid_decomposition", pos_slice=-1, return_labels=True)],
    "full_1_mlp_input_apply_ln": [
        c("get_full_resid_decomposition", layer=1, mlp_input=True, apply_ln=True, pos_slice=-1, return_labels=True)
    ],
    "full_layers_apply_ln": [
        c("get_full_resid_decomposition", layer=-1, expand_neurons=False, apply_ln=True, return_labels=True)
    ],
    "full_project2_apply_ln": [
        c("get_full_resid_decomposition", apply_ln=True, pos_slice=-1, project_output_onto=t("proj2"))
    ],
    "full_1_mlp_input_layers_project1_apply_ln": [
        c(
            "get_full_resid_decomposition",
            layer=1,
            mlp_input=True,
            expand_neurons=False,
            apply_ln=True,
            project_output_onto=t("proj1"),
        )
    ],
    "full_project1": [c("get_full_resid_decomposition", layer=1, project_output_onto=t("proj1"), pos_slice=-1)],
    "full_0": [c("get_full_resid_decomposition", layer=0, return_labels=True)],
    # logit attributions
    "attrs_answer": [
        c(
            "logit_attrs",
            residual_stack=nested("decompose_resid", layer=-1, pos_slice=-1),
            tokens=t("answer"),
            pos_slice=-1,
        )
    ],
    "attrs_answer_minus_wrong": [
        c(
            "logit_attrs",
            residual_stack=nested("decompose_resid", layer=-1, pos_slice=-1),
            tokens=t("answer"),
            incorrect_tokens=t("wrong"),
            pos_slice=-1,
        )
    ],
    "attrs_int_token_all_pos": [c("logit_attrs", residual_stack=nested("accumulated_resid"), tokens=7)],
    "attrs_per_position": [c("logit_attrs", residual_stack=nested("stack_head_results", layer=-1), tokens=t("tokens"))],
    "attrs_full_layers_diff": [
        c(
            "logit_attrs",
            residual_stack=nested("get_full_resid_decomposition", pos_slice=-1, expand_neurons=False),
            tokens=t("answer"),
            incorrect_tokens=t("wrong"),
            pos_slice=-1,
        )
    ],
    "attrs_batch_slice": [
        c(
            "logit_attrs",
            residual_stack=nested("decompose_resid", pos_slice=-1),
            tokens=t("one"),
            pos_slice=-1,
            batch_slice=[1],
        )
    ],
}


def _inputs(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "tokens": torch.randint(0, vocab, (2, 7), generator=g),
        "answer": torch.randint(0, vocab, (2,), generator=g),
        "wrong": torch.randint(0, vocab, (2,), generator=g),
        "one": torch.randint(0, vocab, (1,), generator=g),
        "proj1": torch.randn(D_MODEL, generator=g),
        "proj2": torch.randn(D_MODEL, 3, generator=g),
    }


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict[str, tuple]:
    """``{family: (mechscope cache, inputs, reference values, reference labels)}``."""
    python = reference_python()
    workdir = tmp_path_factory.mktemp("tl_cache")
    models = {f: build_pair(f, seed=4)[0] for f in FAMILIES}
    for model in models.values():
        assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp) == (N_LAYERS, D_MODEL, D_MLP)
    inputs = _inputs(min(m.cfg.d_vocab for m in models.values()))
    for i, model in enumerate(models.values()):
        model.model.save_pretrained(workdir / f"model_{i}")  # neutral names: TL reads family names in paths
    save_file(inputs, str(workdir / "inputs.safetensors"))
    request = {"models": [f"model_{i}" for i in range(len(models))], "cases": CASES}
    (workdir / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    worker = Path(__file__).with_name("cache_reference.py")
    done = subprocess.run([python, str(worker), str(workdir)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"the TransformerLens worker failed:\n{done.stderr[-4000:]}"
    out = {}
    for i, (family, model) in enumerate(models.items()):
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs["tokens"])
        values = load_file(str(workdir / f"out_{i}.safetensors"))
        labels = json.loads((workdir / f"labels_{i}.json").read_text())
        out[family] = (cache, inputs, values, labels)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformer_lens(compared, family, case):
    cache, inputs, values, meta = compared[family]
    if "error" in meta[case]:  # e.g. no hook_resid_mid with parallel attention and MLP: mechscope raises too
        with pytest.raises(Exception) as raised:
            evaluate(cache, CASES[case], inputs)
        assert type(raised.value).__name__ == meta[case]["error"], meta[case]["message"]
        return
    with torch.no_grad():
        value, ours = evaluate(cache, CASES[case], inputs)
    assert ours == meta[case]["labels"]
    assert value.shape == values[case].shape
    torch.testing.assert_close(value, values[case], atol=3e-5, rtol=1e-4)
