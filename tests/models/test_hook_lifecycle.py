"""Adding, removing and validating hooks; stop_at_layer; nothing leaks, even when a hook raises."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.conftest import torch_hook_count


def _inactive(model) -> bool:
    return torch_hook_count(model) == 0 and all(not s.active for s in model.points.attn_sites)


def test_no_pytorch_hook_without_an_active_hook(llama, tokens):
    assert _inactive(llama)
    llama(tokens)
    assert _inactive(llama)


def test_hooks_are_removed_after_a_hook_raises(llama, tokens):
    def boom(t, hook):
        raise RuntimeError("hook failed")

    for name in ["blocks.0.attn.hook_pattern", "blocks.1.ln2.hook_scale", "blocks.0.hook_resid_mid", "hook_logits"]:
        with pytest.raises(RuntimeError, match="hook failed"):
            llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: None), (name, boom)])
        assert _inactive(llama), name
        assert llama.registry.active_names() == set()
    with pytest.raises(RuntimeError, match="hook failed"), llama.hooks(fwd_hooks=[("hook_embed", boom)]):
        llama(tokens)
    assert _inactive(llama)
    with pytest.raises(RuntimeError, match="hook failed"):
        llama.generate("ab", max_new_tokens=2, fwd_hooks=[("blocks.1.attn.hook_z", boom)])
    assert _inactive(llama)


def test_add_hook_persists_until_reset(llama, tokens):
    clean = llama(tokens)
    llama.add_hook("blocks.0.hook_mlp_out", lambda t, h: t * 0)
    try:
        edited = llama(tokens)
        assert not torch.allclose(edited, clean)
        assert torch.equal(llama(tokens), edited)
        assert torch_hook_count(llama) > 0
    finally:
        llama.reset_hooks()
    assert _inactive(llama)
    assert torch.equal(llama(tokens), clean)


def test_unknown_name_lists_closest_valid_names(llama):
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_resid_post"):
        llama.run_with_hooks("hi", fwd_hooks=[("blocks.0.hook_resid_pots", lambda t, h: None)])
    with pytest.raises(KeyError, match="hook_names"):
        llama.add_hook("completely.wrong", lambda t, h: None)
    assert _inactive(llama)


def test_layer_out_of_range_states_the_valid_range(llama):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        llama.run_with_cache("hi", names_filter="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"-2\.\.2"):
        llama.run_with_cache("hi", stop_at_layer=3)


def test_names_filter_forms(llama, tokens):
    _, one = llama.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    assert list(one) == ["blocks.1.hook_resid_post"]
    _, some = llama.run_with_cache(tokens, names_filter=["hook_embed", "blocks.0.attn.hook_z"])
    assert set(some) == {"hook_embed", "blocks.0.attn.hook_z"}
    _, pred = llama.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_scale"))
    assert set(pred) == {
        "blocks.0.ln1.hook_scale",
        "blocks.0.ln2.hook_scale",
        "blocks.1.ln1.hook_scale",
        "blocks.1.ln2.hook_scale",
        "ln_final.hook_scale",
    }
    _, everything = llama.run_with_cache(tokens)
    assert set(everything) == {n for n in llama.hook_names() if not n.endswith("hook_result")}
    _, half = llama.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", dtype=torch.float16)
    assert half["resid_post", 0].dtype == torch.float16
    torch.testing.assert_close(half["resid_post", 0].float(), everything["resid_post", 0], atol=1e-2, rtol=1e-2)


def test_stop_at_layer_runs_no_later_block(llama, tokens):
    ran = []
    blocks = llama.model.model.layers
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        residual, cache = llama.run_with_cache(tokens, stop_at_layer=1)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]
    assert "blocks.0.hook_resid_post" in cache
    assert not any(n.startswith("blocks.1.") or n.startswith("ln_final") for n in cache)
    _, full = llama.run_with_cache(tokens)
    assert torch.equal(cache["resid_post", 0], full["resid_post", 0])
    assert torch.equal(residual, full["resid_pre", 1])  # the residual stream where it stopped
    embedded, zero = llama.run_with_cache(tokens, stop_at_layer=0)
    assert set(zero) == {"hook_embed"} and torch.equal(embedded, full["resid_pre", 0])
    before_last, last = llama.run_with_cache(tokens, stop_at_layer=-1)
    assert "blocks.0.hook_resid_post" in last and "blocks.1.hook_resid_pre" not in last
    assert torch.equal(before_last, full["resid_pre", 1])
    assert torch.equal(llama(tokens, stop_at_layer=2), full["resid_post", 1])
    assert _inactive(llama)


def test_hook_point_carries_name_and_layer(llama, tokens):
    seen = []
    llama.run_with_hooks(
        tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda t, h: seen.append((h.name, h.layer())))]
    )
    assert seen == [("blocks.0.attn.hook_z", 0), ("blocks.1.attn.hook_z", 1)]


def test_bad_hook_return_is_a_clear_error(llama, tokens):
    with pytest.raises(ValueError, match="returned shape"):
        llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: t[:, :1])])
    with pytest.raises(TypeError, match="returned int"):
        llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, h: 3)])
    assert _inactive(llama)


def test_without_attention_hooks_transformers_own_sdpa_runs(llama, tokens, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    real = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    llama(tokens)
    assert len(calls) == llama.cfg.n_layers
    llama.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")  # read-only: SDPA still makes the output
    assert len(calls) == 2 * llama.cfg.n_layers
    llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, h: t * 1.0)])  # edited: explicit
    assert len(calls) == 3 * llama.cfg.n_layers - 1


def test_inference_mode(pair, tokens):
    model, plain = pair
    with torch.inference_mode():
        reference = plain(tokens).logits
        logits, cache = model.run_with_cache(tokens)
        assert torch.equal(logits, reference)
        assert len(cache) == len(model.hook_names()) - model.cfg.n_layers  # all but attn.hook_result

        def halve_in_place(t, hook):
            t.mul_(0.5)

        names = ["blocks.0.attn.hook_pattern", "blocks.1.ln1.hook_normalized", "blocks.0.attn.hook_z"]
        edited = model.run_with_hooks(tokens, fwd_hooks=[(n, halve_in_place) for n in names])
    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(n, lambda t, h: t * 0.5) for n in names])
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(edited, reference, atol=1e-3)


def test_a_hook_that_cannot_take_tensor_and_hook_is_refused_however_often_its_code_is_seen(llama, tokens):
    def factory(with_default: bool):
        if with_default:

            def edit(t, h=None):  # binds fn(tensor, hook)
                return None

            return edit

        def one(t):
            return None

        return one

    for _ in range(3):  # fresh closures of one code object: the answer is remembered per code, still right
        llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", factory(True))])
        with pytest.raises(TypeError, match="cannot be called as fn"):
            llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", factory(False))])

    def two(t, h):
        return None

    two.__signature__ = inspect.signature(lambda t: None)  # a declared signature wins over the code
    with pytest.raises(TypeError, match="cannot be called as fn"):
        llama.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", two)])
    assert _inactive(llama)
