"""Every canonical hook value, recomputed by hand from the HF modules' weights, for every family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from mechscope import HookedModel
from mechscope.models.names import OPT_IN_POINTS, parse_hook
from tests.conftest import torch_hook_count

ATOL = 2e-5


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = 1e-4) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def norm_by_hand(module, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [b,p,1], normalized, output) of a LayerNorm / RMSNorm written out plainly."""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if kind == "layer":
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        normalized = centred / scale
        return scale, normalized, normalized * module.weight + module.bias
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    normalized = x / scale
    weight = 1 + module.weight if kind == "rms_offset" else module.weight
    return scale, normalized, normalized * weight


def rotary(x: torch.Tensor, config) -> torch.Tensor:
    """Rotary position embedding of ``x [b, pos, heads, d]`` (first ``partial_rotary_factor`` of d)."""
    params = config.rope_parameters
    d = x.shape[-1]
    rot = int(d * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.arange(x.shape[1]).float()[:, None] * inv_freq[None]  # [pos, rot/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None, :, None]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None, :, None]
    xr, xp = x[..., :rot], x[..., rot:]
    rotated = torch.cat([-xr[..., rot // 2 :], xr[..., : rot // 2]], -1)
    return torch.cat([xr * cos + rotated * sin, xp], -1)


def qkv_by_hand(model, attn, h: torch.Tensor):
    """q, k, v ``[b, pos, heads, d_head]`` from the attention module's projection weights (``hook_q/k/v``)."""
    c = model.cfg
    b, p, _ = h.shape
    family = c.family
    if family == "gpt2":
        qkv = h @ attn.c_attn.weight + attn.c_attn.bias
        q, k, v = qkv.split(c.d_model, dim=-1)
    elif family == "gpt_neox":
        qkv = (h @ attn.query_key_value.weight.T + attn.query_key_value.bias).view(b, p, c.n_heads, 3 * c.d_head)
        q, k, v = qkv.chunk(3, dim=-1)
    elif family == "phi3":
        qkv = h @ attn.qkv_proj.weight.T
        nq, nk = c.n_heads * c.d_head, c.n_key_value_heads * c.d_head
        q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
    else:

        def lin(m):
            return h @ m.weight.T + (m.bias if m.bias is not None else 0)

        q, k, v = lin(attn.q_proj), lin(attn.k_proj), lin(attn.v_proj)
    q, k, v = (t.reshape(b, p, -1, c.d_head) for t in (q, k, v))
    return q, k, v


def rotated_by_hand(model, attn, q: torch.Tensor, k: torch.Tensor):
    """The q and k attention scores use (``hook_rot_q/k`` on rotary models): Qwen 3's q/k-norm, then rotary."""
    if hasattr(attn, "q_norm"):  # Qwen 3 normalises each head's q and k before rotary
        q, k = norm_by_hand(attn.q_norm, q, "rms")[2], norm_by_hand(attn.k_norm, k, "rms")[2]
    if model.cfg.positional_embedding_type == "rotary":
        q, k = rotary(q, model.model.config), rotary(k, model.model.config)
    return q, k


def block_by_hand(model, cache, layer: int) -> dict[str, torch.Tensor]:
    """Each hook value of block ``layer`` from its input ``resid_pre`` and the block's weights."""
    c, ad, hf_cfg = model.cfg, model.adapter, model.model.config
    block = model.model.get_submodule(ad.backbone).get_submodule(ad.layers)[layer]
    attn = block.get_submodule(ad.attn)
    mlp = block.get_submodule(ad.mlp)
    x = cache["resid_pre", layer]
    out: dict[str, torch.Tensor] = {}
    out["ln1.hook_scale"], out["ln1.hook_normalized"], h = norm_by_hand(block.get_submodule(ad.ln1), x, ad.norm_kind)
    q, k, v = qkv_by_hand(model, attn, h)
    out["attn.hook_q"], out["attn.hook_k"], out["attn.hook_v"] = q, k, v
    q, k = rotated_by_hand(model, attn, q, k)
    if c.positional_embedding_type == "rotary":
        out["attn.hook_rot_q"], out["attn.hook_rot_k"] = q, k
    groups = c.n_heads // c.n_key_value_heads
    k_rep = k.repeat_interleave(groups, dim=2)
    v_rep = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) * attn.scaling
    cap = getattr(hf_cfg, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    pos = x.shape[1]
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out["attn.hook_attn_scores"] = scores
    out["attn.hook_pattern"] = pattern = scores.softmax(-1)
    out["attn.hook_z"] = z = torch.einsum("bhqk,bkhd->bqhd", pattern, v_rep)
    o = attn.get_submodule(ad.o_proj)
    w_o = o.weight if c.family == "gpt2" else o.weight.T  # [n_heads * d_head, d_model]
    out["attn.hook_result"] = torch.einsum("bphd,hdm->bphm", z, w_o.reshape(c.n_heads, c.d_head, -1))
    attn_out = z.flatten(-2) @ w_o + (o.bias if o.bias is not None else 0)
    if c.family == "gemma2":
        out["ln1_post.hook_scale"], out["ln1_post.hook_normalized"], attn_out = norm_by_hand(
            block.post_attention_layernorm, attn_out, "rms_offset"
        )
    out["hook_attn_out"] = attn_out
    ln2_in = x if c.parallel_attn_mlp else x + attn_out
    if not c.parallel_attn_mlp:
        out["hook_resid_mid"] = ln2_in
    out["ln2.hook_scale"], out["ln2.hook_normalized"], h2 = norm_by_hand(
        block.get_submodule(ad.ln2), ln2_in, ad.norm_kind
    )
    act = ACT2FN[c.act_fn]
    if ad.mlp_kind == "plain":
        fc_in, fc_out = mlp.get_submodule(ad.mlp_in), mlp.get_submodule(ad.mlp_down)
        if c.family == "gpt2":
            pre = h2 @ fc_in.weight + fc_in.bias
            post = act(pre)
            mlp_out = post @ fc_out.weight + fc_out.bias
        else:
            pre = h2 @ fc_in.weight.T + fc_in.bias
            post = act(pre)
            mlp_out = post @ fc_out.weight.T + fc_out.bias
    else:
        if ad.mlp_kind == "fused_gated":
            gate, up = (h2 @ mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
        else:
            gate, up = h2 @ mlp.gate_proj.weight.T, h2 @ mlp.up_proj.weight.T
        out["mlp.hook_pre_linear"] = up
        pre, post = gate, act(gate) * up
        mlp_out = post @ mlp.down_proj.weight.T
        if c.family == "gemma2":
            out["ln2_post.hook_scale"], out["ln2_post.hook_normalized"], mlp_out = norm_by_hand(
                block.post_feedforward_layernorm, mlp_out, "rms_offset"
            )
    out["mlp.hook_pre"], out["mlp.hook_post"], out["hook_mlp_out"] = pre, post, mlp_out
    out["hook_resid_post"] = x + attn_out + mlp_out
    return out


@torch.no_grad()
def test_every_hook_value_matches_a_by_hand_forward(pair, tokens):
    model, _ = pair
    names = [*model.hook_names()]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    assert set(cache) == set(names)
    c, ad = model.cfg, model.adapter
    backbone = model.model.get_submodule(ad.backbone)

    embed = backbone.get_submodule(ad.embed).weight[tokens]
    if c.family in ("gemma", "gemma2"):
        embed = embed * math.sqrt(c.d_model)
    close(cache["hook_embed"], embed)
    resid0 = embed
    if ad.pos_embed:
        pos = backbone.get_submodule(ad.pos_embed).weight[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)
        close(cache["hook_pos_embed"], pos)
        resid0 = embed + pos
    close(cache["resid_pre", 0], resid0)

    for layer in range(c.n_layers):
        for short, expected in block_by_hand(model, cache, layer).items():
            close(cache[f"blocks.{layer}.{short}"], expected, atol=1e-4)
        if layer + 1 < c.n_layers:
            assert torch.equal(cache["resid_pre", layer + 1], cache["resid_post", layer])

    final = backbone.get_submodule(ad.final_norm)
    scale, normalized, normed = norm_by_hand(final, cache["resid_post", c.n_layers - 1], ad.norm_kind)
    close(cache["ln_final.hook_scale"], scale)
    close(cache["ln_final.hook_normalized"], normalized)
    close(cache["unembed.hook_in"], normed)
    by_hand = normed @ model.model.get_submodule(ad.lm_head).weight.T
    close(cache["unembed.hook_out"], by_hand, atol=1e-4)
    cap = getattr(model.model.config, "final_logit_softcapping", None)
    if cap:
        by_hand = torch.tanh(by_hand / cap) * cap
    close(logits, by_hand, atol=1e-4)
    assert torch.equal(cache["hook_logits"], logits)

    # the shapes DESIGN.md documents
    b, p = tokens.shape
    assert cache["q", 0].shape == (b, p, c.n_heads, c.d_head)
    assert cache["k", 0].shape == (b, p, c.n_key_value_heads, c.d_head)
    assert cache["pattern", 0].shape == (b, c.n_heads, p, p)
    assert cache["result", 0].shape == (b, p, c.n_heads, c.d_model)
    assert cache["scale", 0, "ln1"].shape == (b, p, 1)


@torch.no_grad()
def test_logits_bitwise_equal_to_plain_transformers(pair, tokens):
    model, plain = pair
    reference = plain(tokens).logits
    assert torch.equal(model(tokens), reference)
    logits, _ = model.run_with_cache(tokens)  # every canonical point cached
    assert torch.equal(logits, reference)
    seen = []
    logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda t, hook: seen.append(hook.name))])
    assert torch.equal(logits, reference)
    assert len(seen) == len(model.hook_names())
    assert torch_hook_count(model) == 0


@torch.no_grad()
def test_pattern_equals_eager_attention_weights(pair, tokens):
    model, plain = pair
    plain.set_attn_implementation("eager")
    try:
        eager = plain(tokens, output_attentions=True).attentions
    finally:
        plain.set_attn_implementation("sdpa" if model.cfg.family != "gemma2" else "eager")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores")))
    for layer, weights in enumerate(eager):
        close(cache["pattern", layer], weights)
        close(cache["pattern", layer], cache["attn_scores", layer].softmax(-1))


@torch.no_grad()
def test_zeroing_a_head_of_hook_z_equals_zeroing_o_proj_input_by_hand(pair, tokens):
    model, plain = pair
    c, ad = model.cfg, model.adapter
    layer, head = 1, 2

    def ablate(z, hook):
        z[:, :, head] = 0.0

    edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    block = plain.get_submodule(ad.backbone).get_submodule(ad.layers)[layer]
    o_proj = block.get_submodule(ad.attn).get_submodule(ad.o_proj)

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * c.d_head : (head + 1) * c.d_head] = 0.0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_slice)
    try:
        reference = plain(tokens).logits
    finally:
        handle.remove()
    close(edited, reference, atol=1e-5)
    assert not torch.allclose(edited, plain(tokens).logits, atol=1e-4)


@torch.no_grad()
def test_edits_flow_downstream_at_every_kind_of_point(pair, tokens):
    """Pairs of edits that must give the same logits, each checked against an independent route."""
    model, _ = pair
    c = model.cfg
    clean = model(tokens)
    vec = torch.randn(c.d_model, generator=torch.Generator().manual_seed(1))

    def add_vec(t, hook):
        return t + vec

    def times(f):
        return lambda t, hook: t * f

    def run(*hooks):
        return model.run_with_hooks(tokens, fwd_hooks=list(hooks))

    # adding to resid_mid == adding to attn_out (resid_mid = resid_pre + attn_out)
    if not c.parallel_attn_mlp:
        close(run(("blocks.0.hook_resid_mid", add_vec)), run(("blocks.0.hook_attn_out", add_vec)), atol=1e-4)
    # adding to resid_post of block 0 == adding to resid_pre of block 1
    close(run(("blocks.0.hook_resid_post", add_vec)), run(("blocks.1.hook_resid_pre", add_vec)), atol=1e-4)
    # doubling a norm's scale == halving its normalized output
    for ln in ("blocks.0.ln1", "blocks.1.ln2", "ln_final"):
        a = run((f"{ln}.hook_scale", times(2.0)))
        close(a, run((f"{ln}.hook_normalized", times(0.5))), atol=1e-4)
        assert not torch.allclose(a, clean, atol=1e-3)
    # scaling every head's result by 0 == zeroing z == attention contributing only its bias
    close(run(("blocks.0.attn.hook_result", times(0.0))), run(("blocks.0.attn.hook_z", times(0.0))), atol=1e-4)
    # zeroing up-projection (gated) or the MLP's post-activation: post = act(pre) * up
    if c.gated_mlp:
        close(run(("blocks.0.mlp.hook_pre_linear", times(0.0))), run(("blocks.0.mlp.hook_post", times(0.0))), atol=1e-4)
    # zeroing q makes every head attend uniformly over the allowed keys
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", times(0.0))]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    p = tokens.shape[1]
    uniform = torch.ones(p, p).tril() / torch.arange(1, p + 1)[:, None]
    close(cache["pattern", 1], uniform.expand_as(cache["pattern", 1]))
    # replacing the pattern by a uniform one == zeroing q (explicit attention path)
    uniform_pattern = uniform.expand(tokens.shape[0], c.n_heads, p, p).clone()
    close(
        run(("blocks.1.attn.hook_pattern", lambda t, hook: uniform_pattern)),
        run(("blocks.1.attn.hook_q", times(0.0))),
        atol=1e-4,
    )
    # the same through scores: constant scores give a uniform pattern
    close(
        run(("blocks.1.attn.hook_attn_scores", lambda t, hook: torch.where(t.isinf(), t, torch.zeros_like(t)))),
        run(("blocks.1.attn.hook_q", times(0.0))),
        atol=1e-4,
    )
    # editing the logits changes what comes back
    assert torch.equal(run(("hook_logits", times(2.0))), clean * 2)
    # returning the activation unchanged (explicit path for pattern) keeps the logits
    close(run(("blocks.0.attn.hook_pattern", lambda t, hook: t.clone())), clean, atol=1e-5)


# Families whose backward hooks are checked at every point; the others at one layer per point kind, a different
# layer for each kind, so every kind is covered on two families and every family is exercised.
FULL_BACKWARD_FAMILIES = ("gpt2", "gemma2")


def backward_points(model: HookedModel, family: str) -> list[str]:
    """Every canonical point for the families in FULL_BACKWARD_FAMILIES; else one layer per point kind."""
    names = model.hook_names()
    if family in FULL_BACKWARD_FAMILIES:
        return names
    parsed = [parse_hook(n) for n in names]
    kinds = list(dict.fromkeys(p.point for p in parsed if p.layer is not None))
    layer_of = {kind: i % model.cfg.n_layers for i, kind in enumerate(kinds)}
    return [n for n, p in zip(names, parsed, strict=True) if p.layer is None or p.layer == layer_of[p.point]]


def test_backward_points_cover_every_kind(pair):
    model, _ = pair
    kinds = {parse_hook(n).point for n in model.hook_names()}
    for family in ("gpt2", "llama"):
        assert {parse_hook(n).point for n in backward_points(model, family)} == kinds


def test_backward_hooks_receive_the_gradient_at_each_point(pair, tokens):
    model, _ = pair
    check_backward_hooks(model, tokens[:1, :6], backward_points(model, model.cfg.family))


@pytest.mark.parametrize("flags", [("use_split_qkv_input", "use_hook_mlp_in"), ("use_attn_in",)])
def test_backward_hooks_at_the_opt_in_points(pair, tokens, flags):
    """(With split inputs on, q, k and v do not read ``hook_attn_in``: it gets no gradient, so it is checked alone.)"""
    model, _ = pair
    if "use_attn_in" in flags and model.cfg.n_key_value_heads != model.cfg.n_heads:
        with pytest.raises(ValueError, match="grouped-query attention"):  # the heads share no input
            model.set_use_attn_in(True)
        assert "blocks.0.hook_attn_in" not in model.hook_names()
        return
    try:
        for flag in flags:
            getattr(model, f"set_{flag}")(True)
        points = {p for f in flags for p in OPT_IN_POINTS[f]}
        names = [n for n in model.hook_names() if parse_hook(n).point in points]
        assert len(names) == model.cfg.n_layers * len(points)
        check_backward_hooks(model, tokens[:1, :6], names)
    finally:
        for flag in flags:
            getattr(model, f"set_{flag}")(False)


def check_backward_hooks(model: HookedModel, tokens: torch.Tensor, names: list[str]) -> None:
    """A backward hook at each of ``names`` gets the gradient a leaf tensor put there gets."""
    grads: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def keep_grad(g, hook):
        grads[hook.name] = g.clone()

    model.run_with_hooks(tokens, bwd_hooks=[(n, keep_grad) for n in names])[:, -1, :5].sum().backward()
    model.zero_grad(set_to_none=True)

    # reference: the same forward with each activation replaced by a leaf whose .grad autograd fills
    def make_leaf(t, hook):
        leaves[hook.name] = leaf = t.detach().clone().requires_grad_(True)
        return leaf

    for name in names:  # one point at a time, so each leaf sees the unmodified graph around it
        model.run_with_hooks(tokens, fwd_hooks=[(name, make_leaf)])[:, -1, :5].sum().backward()
        model.zero_grad(set_to_none=True)
        close(grads[name], leaves[name].grad, atol=1e-5)
    assert torch_hook_count(model) == 0


def test_gqa_kv_hooks_have_their_own_head_count(llama, tokens):
    _, cache = llama.run_with_cache(tokens, names_filter=lambda n: ".attn.hook_" in n)
    assert llama.cfg.n_key_value_heads == 2 < llama.cfg.n_heads == 4
    assert cache["k", 0].shape[2] == cache["v", 0].shape[2] == 2


def test_scores_and_pattern_computed_only_for_hooked_layers(llama, tokens, monkeypatch):
    import mechscope.models.attention as attention

    calls = []
    real = attention.masked_scores
    monkeypatch.setattr(attention, "masked_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    llama(tokens)
    llama.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post", "blocks.1.attn.hook_q"])
    assert calls == []
    llama.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generic_module_points(family, tokens):
    from tests.conftest import build_pair

    model, plain = build_pair(family)
    ad = model.adapter
    attn_path = f"{ad.layers}.0.{ad.attn}"
    names = [f"{attn_path}.hook_result_post", f"{ad.layers}.1.hook_result_pre", f"{ad.layers}.1.hook_result_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens,
            names_filter=[*names, "blocks.0.hook_attn_out", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"],
        )
        assert torch.equal(logits, plain(tokens).logits)
        assert torch.equal(cache[names[0]], cache["blocks.0.hook_attn_out"])
        assert torch.equal(cache[names[1]], cache["blocks.1.hook_resid_pre"])
        assert torch.equal(cache[names[2]], cache["blocks.1.hook_resid_post"])
        vec = torch.randn(model.cfg.d_model)
        close(
            model.run_with_hooks(tokens, fwd_hooks=[(names[0], lambda t, h: t + vec)]),
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", lambda t, h: t + vec)]),
        )
    assert names[0] in model.hook_names(include_module_points=True)
    assert names[0] not in model.hook_names()


def test_padded_batch_matches_single_sequences(llama):
    prompts = ["Hello there, world", "Hi"]
    with torch.no_grad():
        batch = llama(prompts)
        for i, p in enumerate(prompts):
            single = llama(p)
            close(batch[i, : single.shape[1]], single[0], atol=1e-5)
    loss = llama(prompts[0], return_type="loss")
    logits = llama(prompts[0])
    tokens = llama.to_tokens(prompts[0])
    close(loss, F.cross_entropy(logits[0, :-1], tokens[0, 1:]))
