"""Causal tracing against a by-hand noise-and-restore loop."""

from __future__ import annotations

import pytest
import torch

from mechscope.tools.causal import CausalTracer

TOKENS = torch.tensor([[72, 101, 108, 108, 111, 32, 87, 111]])
TARGET = 114


def by_hand(model, names, pos, subject, n_samples=3, noise=3.0, seed=0) -> float:
    """Mean target probability with noise on the subject embeddings and ``names`` restored at ``pos``."""
    std = noise * model.W_E.std().item()
    eps = torch.randn(n_samples, len(subject), model.cfg.d_model, generator=torch.Generator().manual_seed(seed)) * std
    _, clean = model.run_with_cache(TOKENS, names_filter=names or "hook_embed")

    def corrupt(x, hook):
        x = x.clone()
        x[:, subject] += eps
        return x

    def restore(x, hook):
        x[:, pos] = clean[hook.name][0, pos]
        return x

    with torch.no_grad():
        logits = model.run_with_hooks(
            TOKENS.repeat(n_samples, 1), fwd_hooks=[("hook_embed", corrupt)] + [(n, restore) for n in names]
        )
    return logits[:, -1].softmax(-1)[:, TARGET].mean().item()


def test_trace_matches_loop(llama):
    out = CausalTracer(llama).trace(TOKENS, TARGET, [1, 2], n_samples=3)
    assert out["scores"].shape == (llama.cfg.n_layers, 8)
    assert out["corrupted_prob"] == pytest.approx(by_hand(llama, [], 0, [1, 2]), rel=1e-5)
    for layer, pos in [(0, 1), (1, 2), (1, 7)]:
        want = by_hand(llama, [f"blocks.{layer}.hook_resid_pre"], pos, [1, 2])
        assert out["scores"][layer, pos].item() == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        clean = llama(TOKENS)[0, -1].softmax(-1)[TARGET].item()
    assert out["clean_prob"] == pytest.approx(clean, rel=1e-6)


def test_restoring_everything_recovers_clean(llama):
    """Restoring blocks.0.hook_resid_pre at every subject position undoes all the noise."""
    tracer = CausalTracer(llama)
    out = tracer.trace(TOKENS, TARGET, [3], n_samples=2)
    assert out["scores"][0, 3].item() == pytest.approx(out["clean_prob"], rel=1e-5)
    assert out["corrupted_prob"] != pytest.approx(out["clean_prob"], rel=1e-3)
    # positions before the subject are untouched by the noise: restoring them changes nothing
    assert out["scores"][0, :3].tolist() == pytest.approx([out["corrupted_prob"]] * 3, rel=1e-5)


def test_window_kinds_match_loop(gpt2):
    out = CausalTracer(gpt2).trace(TOKENS, TARGET, [1], kind="mlp", window=3, n_samples=2)
    names = [f"blocks.{i}.hook_mlp_out" for i in range(gpt2.cfg.n_layers)]  # window 3 centred on 1 covers 0..1
    assert out["scores"][1, 4].item() == pytest.approx(by_hand(gpt2, names, 4, [1], n_samples=2), rel=1e-5)


def test_subject_as_substring(llama):
    tracer = CausalTracer(llama)
    tokens = llama.to_tokens("Hello Wo", prepend_bos=False)  # the byte tokenizer: one token per character
    assert tracer.subject_positions(tokens[0], "llo") == [2, 3, 4]
    assert tracer.subject_positions(tokens[0], [1, -1]) == [1, 7]
    a = tracer.trace(tokens, TARGET, "ell", n_samples=2)
    b = tracer.trace(tokens, TARGET, [1, 2, 3], n_samples=2)
    assert torch.equal(a["scores"], b["scores"])
    with pytest.raises(ValueError, match="token indices"):
        tracer.subject_positions(TOKENS[0], "xyz")
    with pytest.raises(ValueError, match="kind"):
        tracer.trace(TOKENS, TARGET, [1], kind="heads")
