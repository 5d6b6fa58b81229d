"""TransformerLens's own values for the reference tests; runs in the reference venv, never imported by the suite.

``python tl_worker.py request.json out.safetensors`` (working directory: the folder that holds the models).
It needs only torch, transformers, safetensors and TransformerLens 3.x (which still ships ``HookedTransformer``):
mechscope is not installed there. ``tests/models/transformer_lens_reference.py`` writes the request and reads the
answer.

The request names HF model folders (``save_pretrained`` output; relative names, because TransformerLens reads the
architecture of a path containing "llama" or "gemma" off the path itself) and a list of runs::

    {"inputs": "inputs.safetensors",            # token ids and attention masks, by key
     "runs": [{"id": "gpt2/plain", "model": "m0", "tokens": "t", "mask": null,
               "flags": {"use_split_qkv_input": false, ...},  # TransformerLens's opt-in hook flags
               "names": ["blocks.0.attn.hook_q", ...],        # hook values to return ("*": every hook that fires)
               "edits": [{"hook": ..., "head": 1, "scale": 0.5, "shift": 0.25}],
               "stop_at_layer": null}],
     "act_names": [["k6", null, null], ...]}     # get_act_name calls

and the answer holds ``<id>/out`` (logits, or the residual with ``stop_at_layer``) and ``<id>/<hook name>``, with
the ``get_act_name`` results and the hook names that fired as JSON in the file's metadata.

TransformerLens builds each model from its own config conversion of the folder (Gemma's configs it keeps by model
name only: TransformerLens's Gemma / Gemma 2 config with the sizes of the folder's config) and its own weight
conversion, without any weight processing (no folding, no centring).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from edits import edit_fn  # this folder's edits.py (the worker runs as a script from here)
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformer_lens.utils import get_act_name
from transformers import AutoModelForCausalLM

FLAGS = ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_attn_result")
#: TransformerLens keeps Gemma configs by model name; these are the base configs the folder's sizes override
GEMMA_BASES = {"gemma": "google/gemma-2b", "gemma2": "google/gemma-2-2b"}


def gemma_config(folder: str, hf_config) -> HookedTransformerConfig:
    c = hf_config
    cfg = loading.convert_hf_model_config(GEMMA_BASES[c.model_type])
    n_kv = c.num_key_value_heads
    cfg.update(
        d_model=c.hidden_size,
        d_head=c.head_dim,
        n_heads=c.num_attention_heads,
        n_key_value_heads=n_kv,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_activation if c.model_type == "gemma2" else c.hidden_act,
        rotary_dim=c.head_dim,
        rotary_base=c.rope_parameters["rope_theta"],
    )
    if c.model_type == "gemma2":
        cfg.update(
            window_size=c.sliding_window,
            attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
            attn_scores_soft_cap=c.attn_logit_softcapping,
            output_logits_soft_cap=c.final_logit_softcapping,
            attn_scale=c.query_pre_attn_scalar**0.5,
        )
    cfg.update(tokenizer_name=None, model_name=folder, init_weights=False, device="cpu", dtype=torch.float32)
    return HookedTransformerConfig(**cfg)


def build(folder: str) -> HookedTransformer:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if hf.config.model_type in GEMMA_BASES:
        cfg = gemma_config(folder, hf.config)
    else:
        cfg = loading.get_pretrained_model_config(folder, fold_ln=False, device="cpu", dtype=torch.float32)
        cfg.tokenizer_name = None  # the folders hold no tokenizer; runs pass token ids
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def run_one(model: HookedTransformer, run: dict, inputs: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    for flag in FLAGS:
        setattr(model.cfg, flag, bool(run.get("flags", {}).get(flag, False)))
    tokens = inputs[run["tokens"]]
    mask = inputs[run["mask"]] if run.get("mask") else None
    names = run.get("names", [])
    edits = [(e["hook"], edit_fn(e)) for e in run.get("edits", [])]
    names_filter = None if names == "*" else (lambda n: n in names)
    with torch.no_grad(), model.hooks(fwd_hooks=edits):
        out, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=names_filter, stop_at_layer=run.get("stop_at_layer")
        )
    missing = [] if names == "*" else [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"run {run['id']}: TransformerLens did not reach {missing}")
    result = {f"{run['id']}/out": out}
    result.update({f"{run['id']}/{n}": cache[n] for n in cache})
    return result, list(cache.keys())


def main(request_path: str, out_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    inputs = load_file(request["inputs"])
    models: dict[str, HookedTransformer] = {}
    tensors: dict[str, torch.Tensor] = {}
    fired: dict[str, list[str]] = {}
    for run in request.get("runs", []):
        if run["model"] not in models:
            models[run["model"]] = build(run["model"])
        values, fired[run["id"]] = run_one(models[run["model"]], run, inputs)
        tensors.update({k: v.clone().contiguous() for k, v in values.items()})  # (hooks share tensors)
    metadata = {
        "transformer_lens": version("transformer_lens"),
        "act_names": json.dumps([get_act_name(*args) for args in request.get("act_names", [])]),
        "fired": json.dumps(fired),
    }
    save_file(tensors, out_path, metadata=metadata)


if __name__ == "__main__":
    main(*sys.argv[1:3])
