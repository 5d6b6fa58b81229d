"""Helpers for the mechscope.compat.tdb tests: OpenAI-format autoencoder state dicts, Transformer Debugger's values."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mechscope import HookedModel
from mechscope.compat.tdb import Transformer


def openai_state_dict(d_in: int, n_latents: int, seed: int = 0, topk: int | None = None) -> dict:
    """A random autoencoder in the OpenAI / Transformer Debugger layout (plain tensors and strings)."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "pre_bias": 0.1 * torch.randn(d_in, generator=gen),
        "latent_bias": 0.1 * torch.randn(n_latents, generator=gen),
        "encoder.weight": torch.randn(n_latents, d_in, generator=gen) / d_in**0.5,
        "decoder.weight": torch.randn(d_in, n_latents, generator=gen) / n_latents**0.5,
        "stats_last_nonzero": torch.zeros(n_latents, dtype=torch.long),
        "latents_activation_frequency": torch.rand(n_latents, generator=gen) + 0.01,
        "latents_mean_square": torch.rand(n_latents, generator=gen),
        "activation": "ReLU" if topk is None else "TopK",
        "activation_state_dict": {} if topk is None else {"k": topk, "postact_fn": "ReLU"},
    }
    return state


REFERENCE_FILE = Path(__file__).parent / "data" / "tdb_reference.pt"


@cache
def reference() -> dict[str, torch.Tensor]:
    """The values Transformer Debugger's own code computed (``tdb_reference.py`` regenerates the file)."""
    return torch.load(REFERENCE_FILE, weights_only=True)


def reference_part(prefix: str) -> dict[str, torch.Tensor]:
    """The reference entries under ``prefix/``, with the prefix removed."""
    return {k.removeprefix(prefix + "/"): v for k, v in reference().items() if k.startswith(prefix + "/")}


@cache
def reference_transformer() -> Transformer:
    """The reference file's GPT-2 weights (TDB's layout) in a transformers ``GPT2LMHeadModel``, as a TDB façade.

    TDB's separate ``q_proj``/``k_proj``/``v_proj`` become GPT-2's fused ``c_attn``; its ``nn.Linear`` weights
    ``[out, in]`` become ``Conv1D`` weights ``[in, out]``; the unembedding is the token embedding (tied).
    """
    n_vocab, ctx, d_model, n_layers, n_heads, d_ff = reference()["config"].tolist()
    config = GPT2Config(
        vocab_size=n_vocab,
        n_positions=ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_inner=d_ff,
        activation_function="gelu_new",  # TDB's tanh approximation
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    w = reference_part("weights")
    state = {
        "transformer.wte.weight": w["tok_embed.weight"],
        "transformer.wpe.weight": w["pos_embed.weight"],
        "transformer.ln_f.weight": w["final_ln.weight"],
        "transformer.ln_f.bias": w["final_ln.bias"],
    }
    for layer in range(n_layers):
        tdb, hf = f"xf_layers.{layer}.", f"transformer.h.{layer}."
        for norm in ("ln_1", "ln_2"):
            state.update({f"{hf}{norm}.{p}": w[f"{tdb}{norm}.{p}"] for p in ("weight", "bias")})
        qkv = [f"{tdb}attn.{proj}_proj" for proj in "qkv"]
        state[f"{hf}attn.c_attn.weight"] = torch.cat([w[f"{name}.weight"] for name in qkv]).T
        state[f"{hf}attn.c_attn.bias"] = torch.cat([w[f"{name}.bias"] for name in qkv])
        for ours, theirs in (
            ("attn.c_proj", "attn.out_proj"),
            ("mlp.c_fc", "mlp.in_layer"),
            ("mlp.c_proj", "mlp.out_layer"),
        ):
            state[f"{hf}{ours}.weight"] = w[f"{tdb}{theirs}.weight"].T
            state[f"{hf}{ours}.bias"] = w[f"{tdb}{theirs}.bias"]
    hf_model = GPT2LMHeadModel(config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf_model.lm_head.weight is hf_model.transformer.wte.weight
    return Transformer(HookedModel(hf_model))
