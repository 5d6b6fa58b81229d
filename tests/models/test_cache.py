"""ActivationCache helpers against sums and norms computed plainly, on every family.

Values against TransformerLens itself are in test_cache_reference.py; this file also pins the places where
mechscope departs from TransformerLens on purpose (docs/hooked_models.md, "ActivationCache").
"""

from __future__ import annotations

import pytest
import torch

from mechscope import ActivationCache, get_act_name
from mechscope.models.cache import apply_slice, to_single_token
from tests.conftest import FAMILIES, build_pair


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


POST_NORMS = ["gemma2"]  # normalise each block's attention and MLP outputs: head and neuron results do not sum to them


@pytest.fixture(scope="module", params=[f for f in FAMILIES if f not in POST_NORMS])
def summing_run(request):
    """``run`` for the families whose head and neuron results sum to the block outputs (as in TransformerLens)."""
    model = build_pair(request.param)[0]
    assert model.adapter.attn_out == model.adapter.attn  # no post-norm: the premise of the tests that use this
    tokens = torch.randint(0, 50256, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model, model.run_with_cache(tokens)[1]


def test_post_norm_families_are_the_ones_left_out_of_the_sums():
    assert [f for f in FAMILIES if build_pair(f)[0].adapter.attn_out != build_pair(f)[0].adapter.attn] == POST_NORMS


def resid_at(model, cache, layer: int, mlp_input: bool = False) -> torch.Tensor:
    if mlp_input:
        return cache["resid_mid", layer]
    return cache["resid_pre", layer] if layer < model.cfg.n_layers else cache["resid_post", -1]


def test_layer_arguments(run):
    model, cache = run
    n = model.cfg.n_layers
    for method in (cache.accumulated_resid, cache.decompose_resid, cache.stack_head_results):
        final = method(n)
        for same in (-1, None):
            assert torch.equal(method(same), final)
        assert torch.equal(method(-2), method(n - 1))
        with pytest.raises(ValueError, match="out of range"):
            method(n + 1)
        with pytest.raises(ValueError, match="out of range"):
            method(-n - 2)
    with pytest.raises(ValueError, match="mlp_input"):
        cache.decompose_resid(-1, mlp_input=True)
    assert torch.equal(cache["resid_post", -1], cache["resid_post", n - 1])
    assert cache.stack_activation("resid_post", -1).shape[0] == n


def test_full_decomposition_sums_to_the_residual(summing_run):
    model, cache = summing_run
    n = model.cfg.n_layers
    for layer in range(n + 1):
        for mlp_input in (False, True) if layer < n and not model.cfg.parallel_attn_mlp else (False,):
            target = resid_at(model, cache, layer, mlp_input)
            for expand in (True, False):
                parts, labels = cache.get_full_resid_decomposition(
                    layer, mlp_input, expand_neurons=expand, return_labels=True
                )
                assert len(labels) == parts.shape[0] and labels[-1] == "bias"
                torch.testing.assert_close(parts.sum(0), target, atol=1e-4, rtol=1e-4)
            # through the norm that reads it, with the cached scale: the components sum to its hook_normalized
            norm = "ln_final" if layer == n else f"blocks.{layer}.ln{2 if mlp_input else 1}"
            ln = cache.get_full_resid_decomposition(layer, mlp_input, apply_ln=True, pos_slice=-1)
            torch.testing.assert_close(ln.sum(0), cache[f"{norm}.hook_normalized"][:, -1], atol=1e-4, rtol=1e-4)


def test_head_and_neuron_results_sum_to_the_block_outputs(summing_run, tokens):
    model, cache = summing_run
    for layer in range(model.cfg.n_layers):
        heads = cache.stack_head_results(layer + 1)[-model.cfg.n_heads :]
        torch.testing.assert_close(heads.sum(0) + model.b_O[layer], cache["attn_out", layer], atol=1e-5, rtol=1e-4)
        neurons = cache.get_neuron_results(layer)
        torch.testing.assert_close(neurons.sum(-2) + model.b_out[layer], cache["mlp_out", layer], atol=1e-5, rtol=1e-4)
    # the heads computed from hook_z are the model's own attn.hook_result point
    with torch.no_grad():
        _, own = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(("hook_z", "attn.hook_result")))
    computed = ActivationCache({k: v for k, v in own.items() if k.endswith("hook_z")}, model.cfg, model)
    computed.compute_head_results()
    torch.testing.assert_close(computed["result", 0], own["result", 0], atol=1e-5, rtol=1e-4)


def test_projections_equal_projected_stacks(run):
    model, cache = run
    p = torch.randn(model.cfg.d_model, 3, generator=torch.Generator().manual_seed(1))
    for apply_ln in (False, True):
        full = cache.stack_neuron_results(-1, apply_ln=apply_ln, incl_remainder=True, pos_slice=-1)
        projected = cache.stack_neuron_results(
            -1, apply_ln=apply_ln, incl_remainder=True, pos_slice=-1, project_output_onto=p
        )
        torch.testing.assert_close(projected, full @ p, atol=1e-4, rtol=1e-4)
        one = cache.stack_neuron_results(-1, apply_ln=apply_ln, pos_slice=-1, project_output_onto=p[:, 0])
        torch.testing.assert_close(one, (full[:-1] @ p)[..., 0], atol=1e-4, rtol=1e-4)
    if not model.cfg.parallel_attn_mlp:
        # mlp_input: every component, neurons included, is scaled by ln2's scale (TransformerLens's projected path
        # scales the neurons by ln1's; its unprojected path, which mechscope matches, by ln2's)
        kwargs = dict(layer=1, mlp_input=True, apply_ln=True, pos_slice=-1)
        full = cache.get_full_resid_decomposition(**kwargs)
        torch.testing.assert_close(
            cache.get_full_resid_decomposition(**kwargs, project_output_onto=p), full @ p, atol=1e-4, rtol=1e-4
        )


def test_logit_attrs_sum_to_the_normalised_logit(run):
    model, cache = run
    answer, wrong = torch.tensor([11, 900]), torch.tensor([5, 6])
    stack = cache.decompose_resid(-1, pos_slice=-1)
    attrs = cache.logit_attrs(stack, answer, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 2)
    direct = (cache["ln_final.hook_normalized"][:, -1] * model.W_U[:, answer].T).sum(-1)
    torch.testing.assert_close(attrs.sum(0), direct, atol=1e-4, rtol=1e-4)
    diff = cache.logit_attrs(stack, answer, incorrect_tokens=wrong, pos_slice=-1)
    torch.testing.assert_close(diff, attrs - cache.logit_attrs(stack, wrong, pos_slice=-1), atol=1e-5, rtol=1e-4)
    token = to_single_token(model, "a")
    assert torch.equal(cache.logit_attrs(stack, "a", pos_slice=-1), cache.logit_attrs(stack, token, pos_slice=-1))
    with pytest.raises(ValueError, match="not one"):
        cache.logit_attrs(stack, "ab", pos_slice=-1)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, answer, incorrect_tokens=3, pos_slice=-1)


def test_where_mechscope_departs_from_transformer_lens(run):
    model, cache = run
    # the remainder before block 0 is the residual there (TransformerLens gives the final residual)
    stack, labels = cache.stack_head_results(0, incl_remainder=True, return_labels=True)
    assert labels == ["remainder"]
    assert torch.equal(stack[0], cache["resid_pre", 0])
    # an int neuron_slice picks one neuron of every block (TransformerLens concatenates them along positions)
    one, labels = cache.stack_neuron_results(-1, neuron_slice=5, return_labels=True)
    assert labels == [f"L{i}N5" for i in range(model.cfg.n_layers)]
    assert torch.equal(one, cache.stack_neuron_results(-1, neuron_slice=[5]))
    assert one.shape == (model.cfg.n_layers, *cache["resid_pre", 0].shape)


def test_helpers_that_read_weights_need_the_model(run, tmp_path):
    model, cache = run
    bare = ActivationCache({k: v for k, v in cache.items() if not k.endswith("attn.hook_result")}, model.cfg)
    assert torch.equal(bare.decompose_resid(apply_ln=True), cache.decompose_resid(apply_ln=True))
    for call in (
        bare.compute_head_results,
        lambda: bare.accumulated_resid(apply_ln=True),
        lambda: bare.logit_attrs(bare.decompose_resid(), 3),
        lambda: bare.stack_neuron_results(1),
    ):
        with pytest.raises(ValueError, match=r"ActivationCache.load\(path, model=model\)"):
            call()
    path = cache.save(tmp_path / "c.safetensors")
    loaded = ActivationCache.load(path, model=model)
    assert torch.equal(loaded.accumulated_resid(apply_ln=True), cache.accumulated_resid(apply_ln=True))
    assert cache.to("cpu").model is model


@pytest.mark.parametrize("index", [1.5, [0.5], True, "last", torch.tensor([True, False])])
def test_bad_slices(index):
    with pytest.raises(TypeError, match=r"slice input|integer indices"):
        apply_slice(torch.zeros(2, 3), index, -1)


def test_slices():
    x = torch.arange(24).reshape(2, 3, 4)
    assert torch.equal(apply_slice(x, -1, -2), x[:, -1])
    assert torch.equal(apply_slice(x, (1, 3), -2), x[:, 1:3])
    assert torch.equal(apply_slice(x, [0, 2], 1), x[:, [0, 2]])
    assert torch.equal(apply_slice(x, slice(None, None, 2), -1), x[..., ::2])
    assert apply_slice(x, None, 0) is x


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


def test_load_rejects_another_model(run, gpt2, llama, tmp_path):
    model, cache = run
    other = llama if model.cfg == gpt2.cfg else gpt2
    with pytest.raises(ValueError, match="another architecture"):
        ActivationCache.load(cache.save(tmp_path / "c.safetensors"), model=other)
