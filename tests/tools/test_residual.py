"""Tool "residual" against sums, norms, gradients and logits computed plainly on the HF model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.tools.residual import ResidualTools, ig_quadrature


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    model = request.getfixturevalue(request.param)
    tokens = torch.randint(0, 50256, (2, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, ResidualTools(model), tokens, cache


def _resid(cache, model, layer):
    n = model.cfg.n_layers
    return cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]


def test_decomposition_sums_to_the_residual_at_every_layer(setup):
    model, tool, tokens, cache = setup
    embeds = ["embed", "pos_embed"] if model.cfg.family == "gpt2" else ["embed"]
    for layer in range(model.cfg.n_layers + 1):
        parts = tool.residual_decomposition(tokens, layer)
        expected = embeds + [f"{i}_{k}_out" for i in range(layer) for k in ("attn", "mlp")]
        assert list(parts) == expected
        for name, value in parts.items():
            hook = f"hook_{name}" if name in embeds else f"blocks.{name[0]}.hook_{name[2:]}"
            torch.testing.assert_close(value, cache[hook])
        total = sum(parts.values())
        torch.testing.assert_close(total, _resid(cache, model, layer), atol=1e-5, rtol=1e-5)


def test_movement_by_hand(setup):
    model, tool, tokens, cache = setup
    n = model.cfg.n_layers
    for l1, l2 in [(0, 1), (1, n), (0, 0)]:
        mv = tool.residual_movement(tokens, l1, l2)
        r1, r2 = _resid(cache, model, l1).double(), _resid(cache, model, l2).double()
        n1, n2 = (r1 * r1).sum(-1).sqrt(), (r2 * r2).sum(-1).sqrt()
        diff = ((r2 - r1) ** 2).sum(-1).sqrt()
        expected = {
            "norm1": n1,
            "norm2": n2,
            "norm_change": n2 - n1,
            "relative_change": diff / n1,
            "cosine": (r1 * r2).sum(-1) / (n1 * n2),
        }
        assert set(mv) == set(expected)
        for k, v in expected.items():
            assert mv[k].shape == (2, 6)
            torch.testing.assert_close(mv[k].double(), v, atol=1e-5, rtol=1e-5)


def test_layer_out_of_range_names_the_valid_range(setup):
    model, tool, tokens, _ = setup
    n = model.cfg.n_layers
    with pytest.raises(ValueError, match=rf"layer_idx={n + 1} is out of range: valid layers are 0..{n}"):
        tool.residual_decomposition(tokens, n + 1)
    with pytest.raises(ValueError, match=r"layer_idx2=-1 is out of range"):
        tool.residual_movement(tokens, 0, -1)


def _hf_logit(model, embeds: torch.Tensor, target: int, position: int) -> torch.Tensor:
    """The target logit ``[batch]`` of the plain HF model fed ``inputs_embeds`` (no mechscope hook involved)."""
    logits = model.model(inputs_embeds=embeds).logits
    return logits[:, position, target]


def test_attribution_against_the_plain_model(setup):
    model, tool, tokens, cache = setup
    target, position = 1234, 4
    fa = tool.feature_attribution(tokens, target, position=position)
    embed = model.model.get_input_embeddings()(tokens).detach()  # neither family scales its embedding
    torch.testing.assert_close(embed, cache["hook_embed"])

    with torch.no_grad():
        plain = model.model(input_ids=tokens).logits[:, position, target]
        baseline = _hf_logit(model, torch.zeros_like(embed), target, position)
    torch.testing.assert_close(fa["logit"], plain)
    torch.testing.assert_close(fa["baseline_logit"], baseline)

    e = embed.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_hf_logit(model, e, target, position).sum(), e)
    torch.testing.assert_close(fa["grad_x_input"], (grad * embed).sum(-1), atol=1e-6, rtol=1e-4)
    assert torch.all(fa["grad_x_input"][:, position + 1 :] == 0)  # causal: later tokens cannot matter

    # completeness: IG sums to f(e) - f(0); our quadrature error is tiny on these paths
    gap = plain - baseline
    torch.testing.assert_close(fa["ig_completeness_error"], fa["integrated_gradients"].sum(-1) - gap)
    assert fa["ig_completeness_error"].abs().max() < 1e-3 * gap.abs().max()
    assert torch.all(fa["integrated_gradients"][:, position + 1 :] == 0)


def test_integrated_gradients_against_a_fine_trapezoid_rule(gpt2):
    """GPT-2's zero-token-embedding path is smooth (positions stay): a plain trapezoid rule converges."""
    tool = ResidualTools(gpt2)
    tokens = torch.randint(0, 50256, (1, 5), generator=torch.Generator().manual_seed(4))
    target = 77
    fa = tool.feature_attribution(tokens, target)
    embed = gpt2.model.get_input_embeddings()(tokens).detach()
    steps = 200
    alphas = torch.linspace(0, 1, steps + 1)
    path = (alphas[:, None, None] * embed[0]).requires_grad_()
    (grad,) = torch.autograd.grad(_hf_logit(gpt2, path, target, -1).sum(), path)
    per_alpha = (grad * embed[0]).sum(-1)  # [steps + 1, pos]
    trapezoid = (per_alpha[1:] + per_alpha[:-1]).sum(0) / (2 * steps)
    torch.testing.assert_close(fa["integrated_gradients"][0], trapezoid, atol=2e-5, rtol=1e-3)


def test_direct_logit_attribution_by_hand(setup):
    model, tool, tokens, cache = setup
    targets, position = torch.tensor([5, 4000]), -1
    fa = tool.feature_attribution(tokens, targets, position=position, n_steps=5)
    dla = fa["direct_logit_attribution"]
    hf = model.model
    norm = hf.transformer.ln_f if model.cfg.family == "gpt2" else hf.model.norm
    w_u = hf.lm_head.weight[targets].detach()  # [batch, d_model]
    scale = cache["ln_final.hook_scale"][:, position]  # [batch, 1]
    names = ["embed", "pos_embed"] if model.cfg.family == "gpt2" else ["embed"]
    names += [f"{i}_{k}_out" for i in range(model.cfg.n_layers) for k in ("attn", "mlp")]
    assert list(dla) == [*names, "bias"]
    for name in names:
        hook = f"hook_{name}" if "embed" in name else f"blocks.{name[0]}.hook_{name[2:]}"
        c = cache[hook][:, position]
        if model.cfg.normalization_type == "LN":
            c = c - c.mean(-1, keepdim=True)
        expected = ((c / scale) * norm.weight.detach() * w_u).sum(-1)
        torch.testing.assert_close(dla[name], expected, atol=1e-6, rtol=1e-4)
    norm_bias = norm.bias.detach() if getattr(norm, "bias", None) is not None else torch.zeros(model.cfg.d_model)
    torch.testing.assert_close(dla["bias"], w_u @ norm_bias)
    torch.testing.assert_close(sum(dla.values()), fa["logit"], atol=1e-5, rtol=1e-5)


def test_quadrature_closed_forms():
    nodes, weights = ig_quadrature(50)
    assert nodes.shape == weights.shape == (50,) and ig_quadrature(7)[0].shape == (10,)
    assert torch.all((nodes > 0) & (nodes < 1))
    for k in range(12):  # polynomials: ∫₀¹ αᵏ dα = 1 / (k + 1)
        assert float((weights * nodes**k).sum()) == pytest.approx(1 / (k + 1), rel=1e-12)
    # a normalisation-like path, steep at 0: d/dα [α / sqrt(α² + ε)] integrates to 1 / sqrt(1 + ε)
    eps = 1e-8
    steep = eps / (nodes**2 + eps) ** 1.5
    assert float((weights * steep).sum()) == pytest.approx(1 / math.sqrt(1 + eps), rel=1e-4)
    x, w = np.polynomial.legendre.leggauss(50)  # plain Gauss-Legendre on [0, 1] misses the steep part
    plain = float((w / 2 * eps / (((x + 1) / 2) ** 2 + eps) ** 1.5).sum())
    assert abs(plain - 1) > 0.5


def test_attribution_errors_name_the_fix(setup):
    _, tool, tokens, _ = setup
    with pytest.raises(ValueError, match="position=6 is out of range for sequences of 6 tokens"):
        tool.feature_attribution(tokens, 0, position=6)
    with pytest.raises(ValueError, match=r"one token id or one per sequence \(2\), each in 0\.\.50256"):
        tool.feature_attribution(tokens, 50257)
    with pytest.raises(ValueError, match="one per sequence"):
        tool.feature_attribution(tokens, [1, 2, 3])
    with pytest.raises(ValueError, match="different lengths; pass them one at a time"):
        tool.residual_decomposition(["a", "abc"], 0)
