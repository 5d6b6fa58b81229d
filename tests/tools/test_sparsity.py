"""Tool "sparsity": statistics against plain computations on cached activations."""

from __future__ import annotations

import pytest
import torch

from mechscope.tools import get_tool_class
from mechscope.tools.sparsity import SparsityTools
from tests.conftest import build_pair


@pytest.fixture(scope="module")
def relu_model():
    # GPT-2 with ReLU MLPs: hook_post has exact zeros
    return build_pair("gpt2", seed=6, activation_function="relu")[0]


def test_registered():
    assert get_tool_class("sparsity") is SparsityTools


def _by_hand(x: torch.Tensor, eps: float) -> dict[str, float]:
    """``x [tokens, d]`` → the statistics, one token at a time."""
    n, d = x.shape
    l0, kurt = [], []
    for row in x.double():
        l0.append(sum(1 for v in row.tolist() if abs(v) > eps))
        m = row.mean()
        kurt.append(float(((row - m) ** 4).mean() / ((row - m) ** 2).mean() ** 2))
    return {
        "zero_fraction": float((x == 0).sum()) / (n * d),
        "near_zero_fraction": float((x.abs() <= eps).sum()) / (n * d),
        "l0": sum(l0) / n,
        "mean_abs": float(x.double().abs().mean()),
        "kurtosis": sum(kurt) / n,
        "l0_per_token": l0,
    }


def test_statistics_over_two_batches(relu_model):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50256, (2, 7), generator=gen), torch.randint(0, 50256, (3, 5), generator=gen)]
    names = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    eps = 0.05
    stats = SparsityTools(relu_model).activation_sparsity(batches, names, eps=eps)
    assert list(stats) == names
    caches = [relu_model.run_with_cache(b, names_filter=names)[1] for b in batches]
    for name in names:
        x = torch.cat([c[name].reshape(-1, c[name][0, 0].numel()) for c in caches])  # [29 tokens, d]
        expected = _by_hand(x, eps)
        got = stats[name]
        assert got["n_tokens"] == 2 * 7 + 3 * 5
        for key in ("zero_fraction", "near_zero_fraction", "l0", "mean_abs", "kurtosis"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (name, key)
        assert got["l0_per_token"].tolist() == expected["l0_per_token"]
        torch.testing.assert_close(got["frequency"], (x.abs() > eps).float().mean(0))
    assert stats["blocks.0.mlp.hook_post"]["zero_fraction"] > 0.2  # ReLU
    assert stats["blocks.1.hook_resid_post"]["zero_fraction"] == 0


def test_padding_is_excluded(llama):
    texts = ["a short one", "a much longer text than the first"]
    name = "blocks.0.hook_resid_post"
    stats = SparsityTools(llama).activation_sparsity(texts, name)
    caches = [llama.run_with_cache(t, names_filter=name)[1][name][0] for t in texts]
    x = torch.cat(caches)
    assert stats[name]["n_tokens"] == len(x)
    assert stats[name]["mean_abs"] == pytest.approx(float(x.double().abs().mean()), rel=1e-5)


def test_neuron_frequency_and_dead_neurons(relu_model, tokens):
    layer, neuron = 1, 5

    # kill one neuron: its input bias is made very negative, so ReLU keeps it at 0
    with torch.no_grad():
        bias = relu_model.model.transformer.h[layer].mlp.c_fc.bias
        saved = bias[neuron].item()
        bias[neuron] = -1e4
    try:
        out = SparsityTools(relu_model).neuron_frequency(tokens)
        _, cache = relu_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    finally:
        with torch.no_grad():
            bias[neuron] = saved
    assert out["frequency"].shape == (relu_model.cfg.n_layers, relu_model.cfg.d_mlp)
    for i in range(relu_model.cfg.n_layers):
        post = cache[f"blocks.{i}.mlp.hook_post"].reshape(-1, relu_model.cfg.d_mlp)
        torch.testing.assert_close(out["frequency"][i], (post > 0).float().mean(0))
    assert out["dead"][layer, neuron] and out["frequency"][layer, neuron] == 0
    assert torch.equal(out["dead"], out["frequency"] == 0)


def test_default_points_and_errors(llama, tokens):
    tool = SparsityTools(llama)
    stats = tool.activation_sparsity(tokens)
    suffixes = ("hook_attn_out", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
    assert sorted(stats) == sorted(f"blocks.{i}.{s}" for i in range(llama.cfg.n_layers) for s in suffixes)
    with pytest.raises(KeyError, match="unknown hook point"):
        tool.activation_sparsity(tokens, "blocks.0.hook_resid_pots")
    with pytest.raises(ValueError, match="not per-token activations"):
        tool.activation_sparsity(tokens, "blocks.0.attn.hook_pattern")
