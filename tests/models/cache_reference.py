"""TransformerLens 3.x's ActivationCache values for tests/models/test_cache_reference.py.

The test saves each model (``save_pretrained``), the inputs (``inputs.safetensors``) and the calls to make
(``request.json``) in a directory, and runs this file with the reference Python (one with ``transformer_lens<4``):
``python cache_reference.py DIR``. For every model it builds TransformerLens's ``HookedTransformer`` from the
same weights (TransformerLens's own config and weight conversion, no folding or centring), runs
``run_with_cache`` on the tokens and makes each call on the cache, writing ``out_<i>.safetensors`` (one tensor
per call) and ``labels_<i>.json`` (each call's labels, or the exception it raised, e.g. a ``KeyError`` for
``hook_resid_mid`` on a model with parallel attention and MLP). The test makes the same calls on mechscope's
cache with :func:`evaluate`.

A call is ``[method, kwargs]``; a case is a list of calls on one cache, the last one's result kept. In kwargs,
``{"tuple": [...]}`` is a tuple, ``{"slice": [...]}`` a slice, ``{"tensor": name}`` an input tensor and
``{"call": [method, kwargs]}`` the result of another call; anything else is passed as it is.

This file imports only torch and the standard library at the top: the test imports it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Call = list  # [method, kwargs]


def decode(value: Any, cache: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A kwarg value of a call, decoded (see the module docstring)."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, inner),) = value.items()
        if kind == "tuple":
            return tuple(inner)
        if kind == "slice":
            return slice(*inner)
        if kind == "tensor":
            return tensors[inner]
        if kind == "call":
            return call(cache, inner, tensors)
    return value


def call(cache: Any, spec: Call, tensors: dict[str, torch.Tensor]) -> Any:
    method, kwargs = spec
    return getattr(cache, method)(**{k: decode(v, cache, tensors) for k, v in kwargs.items()})


def evaluate(cache: Any, case: list[Call], tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str] | None]:
    """``(tensor, labels or None)``: the result of the last call of ``case`` (the others run first)."""
    result = None
    for spec in case:
        result = call(cache, spec, tensors)
    if isinstance(result, tuple):
        return result[0], list(result[1])
    assert isinstance(result, torch.Tensor), f"{case} returned {type(result).__name__}"
    return result, None


def reference_model(path: Path):
    """TransformerLens's HookedTransformer with the weights of the HF model saved at ``path``, unprocessed."""
    # transformer_lens exists only in the reference venv, where this file runs as a script
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    if "n_positions" in config and "n_ctx" not in config:  # TransformerLens reads GPT-2's n_ctx, which
        config["n_ctx"] = config["n_positions"]  # transformers 5 no longer writes
        (path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(path)
    cfg = loading.get_pretrained_model_config(str(path), fold_ln=False, device="cpu")
    cfg.tokenizer_name = None  # random models have no tokenizer; tokens are given as ids
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def main(workdir: Path) -> None:
    request = json.loads((workdir / "request.json").read_text())
    tensors = load_file(str(workdir / "inputs.safetensors"))
    for i, model_dir in enumerate(request["models"]):
        model = reference_model(workdir / model_dir)
        with torch.no_grad():
            _, cache = model.run_with_cache(tensors["tokens"])
        values, meta = {}, {}
        for case_id, case in request["cases"].items():
            try:
                with torch.no_grad():
                    values[case_id], labels = evaluate(cache, case, tensors)
                meta[case_id] = {"labels": labels}
            except Exception as e:  # recorded for the test, which expects mechscope to raise the same
                meta[case_id] = {"error": type(e).__name__, "message": str(e)}
        save_file({k: v.contiguous() for k, v in values.items()}, str(workdir / f"out_{i}.safetensors"))
        (workdir / f"labels_{i}.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
