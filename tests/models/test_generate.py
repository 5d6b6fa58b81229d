"""generate(): kv-cached decoding equals full recomputation, hooks apply at every step."""

from __future__ import annotations

import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.requirements import Requirement

from mechscope.models.sampling import sample_next

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def greedy_by_recomputation(model, tokens: torch.Tensor, n: int, fwd_hooks=()) -> torch.Tensor:
    """Reference: no kv cache, re-run the whole sequence for every new token."""
    seq = tokens
    with torch.no_grad():
        for _ in range(n):
            logits = model.run_with_hooks(seq, fwd_hooks=list(fwd_hooks))
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_greedy_generation_equals_recomputation(pair):
    model, _ = pair
    tokens = torch.randint(0, 50256, (2, 6), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():  # the cached steps call transformers without a deprecated argument
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False)
    assert torch.equal(out.tokens, greedy_by_recomputation(model, tokens, 5))
    assert out.new_tokens.shape == (2, 5)
    assert out.strings == model.tokenizer.batch_decode(out.tokens.tolist(), skip_special_tokens=True)


def test_hooks_apply_at_every_step(llama):
    tokens = torch.randint(0, 50256, (1, 5), generator=torch.Generator().manual_seed(4))
    hooks = [("blocks.1.attn.hook_z", lambda z, h: z * 0.0), ("blocks.0.hook_mlp_out", lambda t, h: t * 3.0)]
    out = llama.generate(tokens, max_new_tokens=6, do_sample=False, fwd_hooks=hooks, stop_at_eos=False)
    assert torch.equal(out.tokens, greedy_by_recomputation(llama, tokens, 6, hooks))
    clean = llama.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    assert not torch.equal(out.tokens, clean.tokens)


def test_left_padded_batch_equals_single_prompts(llama):
    prompts = ["The quick brown fox", "Hi"]
    batch = llama.generate(prompts, max_new_tokens=4, do_sample=False, stop_at_eos=False)
    for i, p in enumerate(prompts):
        single = llama.generate(p, max_new_tokens=4, do_sample=False, stop_at_eos=False)
        assert torch.equal(batch.new_tokens[i], single.new_tokens[0])
        assert batch.new_strings[i] == single.new_strings[0]
        assert batch.strings[i] == p + single.new_strings[0]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(500, 1)
    a = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    b = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.tolist()) == {1, 2}
    # exact top-k=2 probabilities: e^5 / (e^5 + e^4) = 0.731
    assert abs((a == 1).float().mean().item() - 0.731) < 0.06
    assert sample_next(logits, temperature=0).eq(1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = sample_next(probs.log().repeat(2000, 1), top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.04


def test_generation_stops_at_eos(llama):
    eos = llama.tokenizer.eos_token_id

    def force_eos(logits, hook):
        out = logits.clone()
        out[..., eos] = 1e4
        return out

    out = llama.generate("abc", max_new_tokens=5, do_sample=False, fwd_hooks=[("hook_logits", force_eos)])
    assert out.new_tokens.tolist() == [[eos]]
    assert out.new_strings == [""]


def test_generation_hooks_q_k_before_and_rot_k_after_the_kv_cache(llama):
    """``hook_q`` / ``hook_k`` (the projections, as TransformerLens's) see the new positions of each step,
    ``hook_rot_k`` every key position; an edit of ``hook_k`` is cached with the key, as recomputation has it."""
    tokens = torch.randint(0, 50256, (1, 5), generator=torch.Generator().manual_seed(5))
    shapes: dict[str, list[int]] = {"blocks.0.attn.hook_k": [], "blocks.0.attn.hook_rot_k": []}

    def record(t, hook):
        shapes[hook.name].append(t.shape[1])

    hooks = [(n, record) for n in shapes]
    llama.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False, fwd_hooks=hooks)
    assert shapes == {"blocks.0.attn.hook_k": [5, 1, 1], "blocks.0.attn.hook_rot_k": [5, 6, 7]}
    edit = [("blocks.0.attn.hook_k", lambda k, hook: k * 2.0 + 0.5)]
    out = llama.generate(tokens, max_new_tokens=6, do_sample=False, fwd_hooks=edit, stop_at_eos=False)
    assert torch.equal(out.tokens, greedy_by_recomputation(llama, tokens, 6, edit))


def test_transformers_is_within_the_bound_ci_tests():
    """pyproject.toml bounds transformers to the releases CI runs; the suite must run on one of them."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (spec,) = [r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "transformers"]
    assert spec.specifier.contains(version("transformers")), (str(spec), version("transformers"))
    assert any(s.operator == "<" for s in spec.specifier), f"{spec}: no upper bound"
