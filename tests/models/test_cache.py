"""ActivationCache helpers against sums and norms computed plainly."""

from __future__ import annotations

import pytest
import torch

from mechscope import ActivationCache, get_act_name


@pytest.fixture(scope="module")
def run(pair):
    model, _ = pair
    tokens = torch.randint(0, 50256, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model, model.run_with_cache(tokens)[1]


def test_shorthand_names():
    assert get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert get_act_name("pattern", 0) == get_act_name("attn", 0) == "blocks.0.attn.hook_pattern"
    assert get_act_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale"
    assert get_act_name("scale") == "ln_final.hook_scale"
    assert get_act_name("post", 1) == "blocks.1.mlp.hook_post"
    with pytest.raises(ValueError, match="give a layer"):
        get_act_name("resid_pre")


def test_decompose_resid_sums_to_the_residual(run):
    model, cache = run
    for layer in range(model.cfg.n_layers + 1):
        parts, labels = cache.decompose_resid(layer, return_labels=True)
        target = cache["resid_post", layer - 1] if layer == model.cfg.n_layers else cache["resid_pre", layer]
        torch.testing.assert_close(parts.sum(0), target, atol=1e-4, rtol=1e-4)
        assert (
            len(labels) == parts.shape[0] == (2 if model.cfg.positional_embedding_type == "standard" else 1) + 2 * layer
        )


def test_accumulated_resid_and_stack(run):
    model, cache = run
    n = model.cfg.n_layers
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    assert torch.equal(acc[-1], cache["resid_post", n - 1])
    assert torch.equal(acc[1], cache["resid_pre", 1])
    stack = cache.stack_activation("resid_post")
    assert stack.shape == (n, 2, 7, model.cfg.d_model)
    assert torch.equal(stack[1], cache["blocks.1.hook_resid_post"])
    if not model.cfg.parallel_attn_mlp:
        mid = cache.accumulated_resid(1, incl_mid=True)
        assert torch.equal(mid[1], cache["resid_mid", 0])


def test_apply_ln_to_stack_matches_the_norms(run):
    model, cache = run
    # with the cached scale (no recompute) the final residual maps to ln_final.hook_normalized ...
    final = cache.apply_ln_to_stack(cache.accumulated_resid()[-1:], layer=-1)[0]
    torch.testing.assert_close(final, cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-4)
    # ... and the logit lens (accumulated_resid(apply_ln=True), recomputed) to the final norm's output
    lens = cache.accumulated_resid(apply_ln=True)
    out = cache["ln_final.hook_normalized"] * model.ln_final_w + model.ln_final_b
    torch.testing.assert_close(lens[-1], out, atol=1e-5, rtol=1e-4)
    layer1 = cache.apply_ln_to_stack(cache["resid_pre", 1][None], layer=1)[0]
    torch.testing.assert_close(layer1, cache["blocks.1.ln1.hook_normalized"], atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(run, tmp_path):
    model, cache = run
    path = cache.save(tmp_path / "c.safetensors")
    loaded = ActivationCache.load(path)
    assert loaded.cfg == model.cfg
    assert set(loaded) == set(cache)
    for k in cache:
        assert torch.equal(loaded[k], cache[k])
    moved = cache.to("cpu", dtype=torch.float64)
    assert moved["resid_pre", 0].dtype == torch.float64


def test_load_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an ActivationCache"):
        ActivationCache.load(tmp_path / "x.safetensors")
