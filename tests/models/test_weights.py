"""Weight views (W_Q ... W_U), OV and QK: every hook value of a forward pass recomputed from them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILIES, build_pair
from tests.models.test_hook_semantics import close, rotary


@pytest.fixture(scope="module", params=[*FAMILIES, "qwen3"])
def model(request):
    return build_pair(request.param)[0]


def _module_output(*path: str) -> str:
    """The generic hook name of a backbone module's output, e.g. ``layers.0.self_attn.o_proj.hook_result_post``."""
    return ".".join(path) + ".hook_result_post"


@torch.no_grad()
def test_hook_values_from_weight_views(model, tokens):
    c, ad = model.cfg, model.adapter
    hf_cfg = model.model.config
    # o_proj and down-projection outputs: what hook_attn_out / hook_mlp_out are, before Gemma 2's post-norms
    o_names = [_module_output(ad.layers, str(i), ad.attn, ad.o_proj) for i in range(c.n_layers)]
    down_names = [_module_output(ad.layers, str(i), ad.mlp, ad.mlp_down) for i in range(c.n_layers)]
    logits, cache = model.run_with_cache(tokens, names_filter=[*model.hook_names(), *o_names, *down_names])
    b, p = tokens.shape

    assert model.W_E.shape == (c.d_vocab, c.d_model)
    close(cache["hook_embed"], model.W_E[tokens])
    if c.positional_embedding_type == "standard":
        assert model.W_pos.shape == (c.n_ctx, c.d_model)
        close(cache["hook_pos_embed"], model.W_pos[:p].expand(b, p, c.d_model))
    else:
        with pytest.raises(ValueError, match="only learned"):
            _ = model.W_pos

    W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O  # noqa: N806
    assert W_Q.shape == W_K.shape == W_V.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert model._W_K.shape == model._W_V.shape == (c.n_layers, c.n_key_value_heads, c.d_model, c.d_head)
    assert W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert model.W_in.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert model.W_out.shape == (c.n_layers, c.d_mlp, c.d_model)
    groups = c.n_heads // c.n_key_value_heads
    for layer in range(c.n_layers):
        attn = model.model.get_submodule(ad.backbone).get_submodule(ad.layers)[layer].get_submodule(ad.attn)
        h1 = cache["normalized", layer, "ln1"] * model.ln1_w[layer] + model.ln1_b[layer]
        q = torch.einsum("bpm,hmd->bphd", h1, W_Q[layer]) + model.b_Q[layer]
        k = torch.einsum("bpm,hmd->bphd", h1, model._W_K[layer]) + model._b_K[layer]
        v = torch.einsum("bpm,hmd->bphd", h1, model._W_V[layer]) + model._b_V[layer]
        close(cache["v", layer], v)
        # the repeated views are the un-repeated ones at kv head h // groups
        close(torch.einsum("bpm,hmd->bphd", h1, W_V[layer]) + model.b_V[layer], v.repeat_interleave(groups, dim=2))
        k_rep = torch.einsum("bpm,hmd->bphd", h1, W_K[layer]) + model.b_K[layer]
        close(k_rep, k.repeat_interleave(groups, dim=2))
        close(cache["q", layer], q)  # the projections, before q/k-norm and rotary
        close(cache["k", layer], k)
        if hasattr(attn, "q_norm"):  # Qwen 3 normalises each head's query and key before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        if c.positional_embedding_type == "rotary":
            close(cache["rot_q", layer], rotary(q, hf_cfg))
            close(cache["rot_k", layer], rotary(k, hf_cfg))

        z = cache["z", layer]
        close(cache["result", layer], torch.einsum("bphd,hdm->bphm", z, W_O[layer]))
        attn_out = torch.einsum("bphd,hdm->bpm", z, W_O[layer]) + model.b_O[layer]
        close(cache[o_names[layer]], attn_out, atol=1e-4)
        if c.family != "gemma2":  # Gemma 2 normalises the attention output before adding it
            close(cache["attn_out", layer], attn_out, atol=1e-4)

        h2 = cache["normalized", layer, "ln2"] * model.ln2_w[layer] + model.ln2_b[layer]
        up = h2 @ model.W_in[layer] + model.b_in[layer]
        if c.gated_mlp:
            close(cache["pre", layer], h2 @ model.W_gate[layer] + model.b_gate[layer], atol=1e-4)
            close(cache["pre_linear", layer], up, atol=1e-4)
        else:
            close(cache["pre", layer], up, atol=1e-4)
            with pytest.raises(ValueError, match="plain MLP"):
                _ = model.W_gate
        mlp_out = cache["post", layer] @ model.W_out[layer] + model.b_out[layer]
        close(cache[down_names[layer]], mlp_out, atol=1e-4)
        if c.family != "gemma2":
            close(cache["mlp_out", layer], mlp_out, atol=1e-4)

    final = cache["ln_final.hook_normalized"] * model.ln_final_w + model.ln_final_b
    by_hand = final @ model.W_U + model.b_U
    cap = getattr(hf_cfg, "final_logit_softcapping", None)
    if cap:
        by_hand = torch.tanh(by_hand / cap) * cap
    close(logits, by_hand, atol=1e-4)


def test_views_follow_the_parameters_and_carry_gradients(llama):
    """A view is read on access: editing a parameter shows up, and gradients reach the parameter."""
    o_proj = llama.model.model.layers[1].self_attn.o_proj
    llama.zero_grad(set_to_none=True)  # the model is shared by the session: start from no gradient
    W_O = llama.W_O  # noqa: N806
    W_O[1, 2].sum().backward()
    expected = torch.zeros_like(o_proj.weight)
    expected[:, 2 * llama.cfg.d_head : 3 * llama.cfg.d_head] = 1.0  # head 2's input columns of o_proj
    assert torch.equal(o_proj.weight.grad, expected)
    llama.zero_grad(set_to_none=True)
    saved = o_proj.weight.detach().clone()
    with torch.no_grad():
        o_proj.weight[0, 2 * llama.cfg.d_head] += 1.0
        try:
            assert llama.W_O[1, 2, 0, 0] == W_O[1, 2, 0, 0] + 1.0
        finally:
            o_proj.weight.copy_(saved)


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_norm_weights_are_the_effective_multiplier(family):
    model, _ = build_pair(family)
    ln = model.model.model.layers[0].input_layernorm if family == "gemma" else model.model.transformer.h[0].ln_1
    if family == "gemma":  # Gemma's RMSNorm multiplies by (1 + weight)
        assert torch.equal(model.ln1_w[0], 1 + ln.weight)
        assert torch.equal(model.ln1_b[0], torch.zeros(model.cfg.d_model))
    else:
        assert torch.equal(model.ln1_w[0], ln.weight) and torch.equal(model.ln1_b[0], ln.bias)


@torch.no_grad()
def test_ov_circuit_equals_the_heads_value_path(pair, tokens):
    """With every query attending to position 0, head h writes ``x0 @ W_V W_O + b_V W_O`` (x0 = ln1 output at 0)."""
    model, _ = pair
    c, layer = model.cfg, 1
    b, p = tokens.shape
    first_key = torch.zeros(b, c.n_heads, p, p)
    first_key[..., 0] = 1.0
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", lambda t, hook: first_key)]):
        _, cache = model.run_with_cache(
            tokens, names_filter=[f"blocks.{layer}.attn.hook_result", f"blocks.{layer}.ln1.hook_normalized"]
        )
    x0 = cache["normalized", layer, "ln1"][:, 0] * model.ln1_w[layer] + model.ln1_b[layer]  # [batch, d_model]
    ov = model.OV
    assert ov.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    for batch in range(b):
        through_ov = x0[batch] @ ov[layer]  # [n_heads, d_model]
        bias_path = torch.einsum("hd,hdm->hm", model.b_V[layer], model.W_O[layer])
        for pos in range(p):
            close(cache["result", layer][batch, pos], through_ov + bias_path, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_qk_circuit_gives_the_attention_score_at_position_zero(family, tokens):
    """Rotary leaves position 0 unrotated, so scores[0, 0] = (x0 W_Q + b_Q)(x0 W_K + b_K)^T * scaling."""
    model, _ = build_pair(family)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("attn_scores", "ln1.hook_normalized")))
    scaling = model.block_part(0, "attn").scaling
    x0 = cache["normalized", 0, "ln1"][:, 0] * model.ln1_w[0] + model.ln1_b[0]  # [batch, d_model]
    qk, W_Q, W_K, b_Q, b_K = model.QK[0], model.W_Q[0], model.W_K[0], model.b_Q[0], model.b_K[0]  # noqa: N806
    for batch in range(tokens.shape[0]):
        x = x0[batch]
        bilinear = (x @ qk) @ x  # [n_heads]
        with_biases = bilinear + torch.einsum("m,hmd,hd->h", x, W_Q, b_K) + torch.einsum("hd,hmd,m->h", b_Q, W_K, x)
        with_biases = with_biases + (b_Q * b_K).sum(-1)
        close(cache["attn_scores", 0][batch, :, 0, 0], with_biases * scaling, atol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_weight_views_reproduce_its_forward_pass():
    """The real SmolLM2-135M (grouped-query, 9 heads over 3 kv heads, tied embeddings)."""
    from mechscope import HookedModel

    model = HookedModel.from_pretrained("smollm2-135m")
    tokens = model.to_tokens("The capital of France is Paris, and the capital of Italy is")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(("blocks.7.", "ln_final")))
    h1 = cache["normalized", 7, "ln1"] * model.ln1_w[7]
    close(cache["v", 7], torch.einsum("bpm,hmd->bphd", h1, model._W_V[7]))
    q = torch.einsum("bpm,hmd->bphd", h1, model.W_Q[7])
    close(cache["q", 7], q, atol=1e-4)
    close(cache["rot_q", 7], rotary(q, model.model.config), atol=1e-4)
    close(cache["attn_out", 7], torch.einsum("bphd,hdm->bpm", cache["z", 7], model.W_O[7]), atol=1e-4)
    close(cache["mlp_out", 7], cache["post", 7] @ model.W_out[7], atol=1e-4)
    close(logits, cache["ln_final.hook_normalized"] * model.ln_final_w @ model.W_U, atol=1e-3)
