"""Tool "attention": patterns, top tokens, ablation by hooks, previous-token and induction scores."""

from __future__ import annotations

import pytest
import torch

from mechscope.tools import get_tool_class
from mechscope.tools.attention import AttentionTools, repeated_tokens


def _state(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def _assert_state_unchanged(model, before):
    after = model.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_registered():
    assert get_tool_class("attention") is AttentionTools


def test_patterns_and_top_tokens(llama, tokens):
    tool = AttentionTools(llama)
    _, cache = llama.run_with_cache(tokens)
    patterns = tool.attention_patterns(tokens)
    assert patterns.shape == (llama.cfg.n_layers, 2, llama.cfg.n_heads, 12, 12)
    torch.testing.assert_close(patterns[1], cache["blocks.1.attn.hook_pattern"])
    top = tool.top_attended_tokens(tokens, layer=1, head=2, k=3)
    p = cache["blocks.1.attn.hook_pattern"][:, 2]  # [batch, q, k]
    for b in range(2):
        for q in range(2, 12):  # queries with at least k visible keys (masked keys tie at 0)
            order = sorted(range(12), key=lambda j: -float(p[b, q, j]))[:3]
            assert sorted(top["positions"][b, q].tolist()) == sorted(order)
            assert top["token_ids"][b, q].tolist() == [int(tokens[b, j]) for j in top["positions"][b, q]]
            assert torch.allclose(top["weights"][b, q], p[b, q, top["positions"][b, q]])
    one = tool.top_attended_tokens(tokens, layer=0, query_pos=0, k=2)
    assert one["positions"].shape == (2, llama.cfg.n_heads, 2)
    assert (one["positions"][..., 0] == 0).all() and torch.allclose(one["weights"][..., 0], torch.ones(1))


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablation_equals_editing_z_by_hand(gpt2, tokens, method):
    before = _state(gpt2)
    layer, head = 1, 3
    _, cache = gpt2.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_z")
    z = cache[f"blocks.{layer}.attn.hook_z"]
    value = torch.zeros(z.shape[-1]) if method == "zero" else z[:, :, head].mean(dim=(0, 1))

    def by_hand(t, hook):
        t[:, :, head] = value

    with torch.no_grad():
        expected = gpt2.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", by_hand)])
    got = AttentionTools(gpt2).ablate_heads(tokens, (layer, head), method=method)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, gpt2(tokens).detach())
    _assert_state_unchanged(gpt2, before)


def test_zero_ablating_a_last_layer_head_removes_its_output(llama, tokens):
    # independent of hooks on z: attn_out loses exactly z_h @ W_O[h]
    before = _state(llama)
    layer, head = llama.cfg.n_layers - 1, 1
    names = [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
    _, clean = llama.run_with_cache(tokens, names_filter=names)
    hooks = AttentionTools(llama).ablation_hooks([(layer, head)])
    with llama.hooks(fwd_hooks=hooks):
        _, ablated = llama.run_with_cache(tokens, names_filter=names)
    removed = clean[names[0]][:, :, head] @ llama.W_O[layer, head].detach()
    torch.testing.assert_close(ablated[names[1]], clean[names[1]] - removed, atol=1e-5, rtol=1e-5)
    _assert_state_unchanged(llama, before)


def _replace_pattern(layer: int, head: int, target: torch.Tensor):
    def hook(pattern, h):
        pattern = pattern.clone()
        pattern[:, head] = target
        return pattern

    return (f"blocks.{layer}.attn.hook_pattern", hook)


def test_previous_token_score_of_hand_made_patterns(llama, tokens):
    n = tokens.shape[1]
    prev = torch.zeros(n, n)
    prev[0, 0] = 1
    prev[torch.arange(1, n), torch.arange(n - 1)] = 1
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    tool = AttentionTools(llama)
    with llama.hooks(fwd_hooks=[_replace_pattern(0, 2, prev), _replace_pattern(1, 0, uniform)]):
        scores = tool.previous_token_scores(tokens)
    assert scores.shape == (llama.cfg.n_layers, llama.cfg.n_heads)
    assert scores[0, 2].item() == pytest.approx(1.0)
    # uniform causal attention: query i gives 1/(i+1) to i-1; mean over i = 1..n-1
    assert scores[1, 0].item() == pytest.approx(sum(1 / (i + 1) for i in range(1, n)) / (n - 1))
    # unhooked heads: the plain definition on the cached patterns
    _, cache = llama.run_with_cache(tokens)
    p = cache["blocks.1.attn.hook_pattern"]
    plain = torch.stack([p[:, :, i, i - 1] for i in range(1, n)]).mean(dim=(0, 1))
    torch.testing.assert_close(tool.previous_token_scores(tokens)[1], plain)


def test_induction_score_of_a_hand_made_induction_head(llama):
    seq_len = 6
    tokens = repeated_tokens(llama, seq_len=seq_len, batch=3, seed=1)
    bos = llama.tokenizer.bos_token_id
    assert tokens.shape == (3, 1 + 2 * seq_len) and (tokens[:, 0] == bos).all()
    assert torch.equal(tokens[:, 1 : 1 + seq_len], tokens[:, 1 + seq_len :])
    n = tokens.shape[1]
    induction = torch.zeros(n, n)
    induction[torch.arange(n), 0] = 1  # first copy: attend to BOS
    for q in range(1 + seq_len, n):  # second copy: the token after the previous occurrence
        induction[q] = 0
        induction[q, q - seq_len + 1] = 1
    tool = AttentionTools(llama)
    with llama.hooks(fwd_hooks=[_replace_pattern(1, 3, induction)]):
        scores = tool.induction_scores(seq_len=seq_len, batch=3, seed=1)
    assert scores[1, 3].item() == pytest.approx(1.0)
    # by hand on the model's own patterns
    _, cache = llama.run_with_cache(tokens)
    p = cache["blocks.0.attn.hook_pattern"]
    plain = torch.stack([p[:, :, q, q - seq_len + 1] for q in range(1 + seq_len, n)]).mean(dim=(0, 1))
    torch.testing.assert_close(tool.induction_scores(seq_len=seq_len, batch=3, seed=1)[0], plain)


def test_errors_name_the_fix(llama, tokens):
    tool = AttentionTools(llama)
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        tool.attention_patterns(tokens, layer=5)
    with pytest.raises(ValueError, match=r"valid heads are 0\.\.3"):
        tool.ablate_heads(tokens, (0, 9))
    with pytest.raises(ValueError, match="use one of"):
        tool.ablate_heads(tokens, (0, 1), method="resample")
    with pytest.raises(ValueError, match="needs reference_ids"):
        tool.ablation_hooks((0, 1), method="mean")
