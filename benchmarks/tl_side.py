"""The TransformerLens ``HookedTransformer`` contender of ``hook_peers.py`` and ``cache_memory.py``, run by the
SAELens venv's python (``.venv-saelens``: TransformerLens 3.x, the last with ``HookedTransformer``).

    .venv-saelens/bin/python benchmarks/tl_side.py serve SPEC.json
    .venv-saelens/bin/python benchmarks/tl_side.py memory SPEC.json

``SPEC.json`` names a GPT-2 folder (``save_pretrained`` output), a safetensors file of token ids (key ``tokens``,
``[batch, pos]``), the hook names to cache and the torch threads. The model is TransformerLens's own config and
weight conversion of that folder, without weight processing (no folding, no centring), as the reference tests build
it (``tests/models/tl_worker.py``).

``serve`` writes ``answer`` (safetensors: ``logits`` and the cached ``names`` of one ``run_with_cache``), prints one
JSON line with TransformerLens's version, then answers each unit name on stdin with ``done SECONDS``, the time of
that one call measured here: ``forward`` (the model on the tokens), ``cache`` (``run_with_cache`` keeping
``names``), ``empty`` (``run_with_cache`` keeping nothing). End of input ends it.

``memory`` runs one ``run_with_cache`` keeping every hook point and prints one JSON line: the resident set size
before it and its peak during it (:func:`harness.peak_rss`), the number of cached tensors and the bytes of the
distinct storages of those and of the logits.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import torch
from harness import peak_rss, storage_bytes  # this folder's harness.py (no third-party imports)
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading
from transformers import AutoModelForCausalLM


def build(folder: str) -> HookedTransformer:
    """TransformerLens's conversion of the GPT-2 in ``folder``, unprocessed; the HF model is freed afterwards."""
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = loading.get_pretrained_model_config(folder, fold_ln=False, device="cpu", dtype=torch.float32)
    cfg.tokenizer_name = None  # the folder holds no tokenizer; the runs pass token ids
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def serve(spec: dict, model: HookedTransformer, tokens: torch.Tensor) -> None:
    names = set(spec["names"])
    units: dict[str, Callable[[], object]] = {
        "forward": lambda: model(tokens),
        "cache": lambda: model.run_with_cache(tokens, names_filter=lambda name: name in names),
        "empty": lambda: model.run_with_cache(tokens, names_filter=lambda _: False),
    }
    logits, cache = units["cache"]()
    save_file({"logits": logits, **{n: cache[n].contiguous() for n in names}}, spec["answer"])
    print(json.dumps({"version": version("transformer_lens")}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        units[line.strip()]()
        print(f"done {time.perf_counter() - start:.9f}", flush=True)


def memory(model: HookedTransformer, tokens: torch.Tensor) -> None:
    baseline, peak, (logits, cache) = peak_rss(lambda: model.run_with_cache(tokens))
    tensors = list(cache.values())
    answer = {"baseline": baseline, "peak": peak, "tensors": len(tensors), "bytes": storage_bytes([*tensors, logits])}
    print(json.dumps({**answer, "names": sorted(cache.keys())}), flush=True)


def main(mode: str, spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    model = build(spec["folder"])
    tokens = load_file(spec["tokens"])["tokens"]
    with torch.inference_mode():
        model(tokens[:1, :1])  # one token through first, as every contender of cache_memory.py does
        if mode == "serve":
            serve(spec, model, tokens)
        elif mode == "memory":
            memory(model, tokens)
        else:
            raise ValueError(f"mode must be 'serve' or 'memory', got {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
