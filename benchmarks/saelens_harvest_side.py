"""The SAELens contenders of ``harvest.py``, run by the SAELens venv's python (``.venv-saelens``).

    .venv-saelens/bin/python benchmarks/saelens_harvest_side.py WORKLOAD.json

``WORKLOAD.json`` names an HF model folder (``save_pretrained`` output with its tokenizer, relative to the
working directory it names; a name without "llama" or "gemma", from which TransformerLens would guess the
architecture instead of reading the folder's config), a JSONL corpus (one ``{"text": ...}`` per line), the
model class (SAELens's ``model_class_name``: ``HookedTransformer`` or ``AutoModelForCausalLM``), the hook name,
the store's sizes, the token ids to exclude, the threads and where to write the check. The script builds
SAELens's ``ActivationsStore`` over the corpus, writes the tokens and activations of its first forward pass
(``get_raw_llm_batch``: ``[batch * context]`` and ``[batch * context, d_in]``) to the check file and prints one
JSON line with SAELens's version. Then each ``step`` line on stdin runs ``get_filtered_llm_batch`` (tokenise the
next contexts, the forward pass to the hook's layer, drop the excluded tokens' rows: one harvest batch) and answers
``done``; end of input ends it.
"""

from __future__ import annotations

import json
import os
import sys

import sae_lens
import torch
from datasets import load_dataset
from sae_lens.load_model import load_model
from sae_lens.training.activations_store import ActivationsStore
from safetensors.torch import save_file
from side_protocol import serve
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading
from transformers import AutoModelForCausalLM, AutoTokenizer


def hooked_transformer(folder: str) -> HookedTransformer:
    """What SAELens's ``load_model("HookedTransformer", ...)`` builds (``from_pretrained_no_processing``), from a
    local folder: TransformerLens's own config and weight conversion of it, no weight processing."""
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = loading.get_pretrained_model_config(folder, fold_ln=False, device="cpu", dtype=torch.float32)
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(folder), move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    os.chdir(spec["workdir"])
    folder, hook = spec["folder"], spec["hook_name"]
    if spec["model_class"] == "HookedTransformer":
        model = hooked_transformer(folder)
    else:
        model = load_model(spec["model_class"], folder, device="cpu", hook_names=[hook])
    store = ActivationsStore(
        model=model,
        dataset=load_dataset("json", data_files=spec["corpus"], split="train"),
        streaming=False,
        hook_name=hook,
        hook_head_index=None,
        context_size=spec["context_size"],
        d_in=spec["d_in"],
        n_batches_in_buffer=1,
        total_training_tokens=10**12,
        store_batch_size_prompts=spec["batch_contexts"],
        train_batch_size_tokens=spec["batch_contexts"] * spec["context_size"],
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        exclude_special_tokens=torch.tensor(spec["exclude_tokens"]),
        sequence_separator_token="eos",
    )
    activations, tokens = store.get_raw_llm_batch()
    assert tokens is not None
    save_file({"tokens": tokens.contiguous(), "activations": activations.contiguous()}, spec["check"])
    serve(store.get_filtered_llm_batch, {"version": sae_lens.__version__})


if __name__ == "__main__":
    main()
