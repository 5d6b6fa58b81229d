"""Activation and attribution patching against plain by-hand loops."""

from __future__ import annotations

import pytest
import torch

from mechscope.tools.patching import ActivationPatching, logit_diff, target_prob


@pytest.fixture
def runs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 50256, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 50256, (2,), generator=g)
    return clean, corrupted


METRIC = logit_diff([11, 12], [13, 14])


def by_hand(model, clean, corrupted, name, index) -> float:
    """Metric of the corrupted run with ``act[index]`` copied from the clean run."""
    _, cache = model.run_with_cache(clean, names_filter=name)

    def patch(act, hook):
        act[index] = cache[name][index]

    with torch.no_grad():
        return float(METRIC(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))


def test_layer_grid_matches_loop(llama, runs):
    grid = ActivationPatching(llama).patch_layers(*runs, METRIC, site="mlp_out")
    assert grid.shape == (llama.cfg.n_layers, 6)
    for layer in range(llama.cfg.n_layers):
        for pos in range(6):
            want = by_hand(llama, *runs, f"blocks.{layer}.hook_mlp_out", (slice(None), pos))
            assert grid[layer, pos].item() == pytest.approx(want, abs=1e-5)


def test_head_grids_match_loop(gpt2, runs):
    tool = ActivationPatching(gpt2)
    heads = tool.patch_heads(*runs, METRIC)
    per_pos = tool.patch_heads(*runs, METRIC, per_position=True)
    assert heads.shape == (gpt2.cfg.n_layers, gpt2.cfg.n_heads)
    assert per_pos.shape == (gpt2.cfg.n_layers, 6, gpt2.cfg.n_heads)
    name = "blocks.1.attn.hook_z"
    assert heads[1, 2].item() == pytest.approx(by_hand(gpt2, *runs, name, (slice(None), slice(None), 2)), abs=1e-5)
    assert per_pos[1, 3, 0].item() == pytest.approx(by_hand(gpt2, *runs, name, (slice(None), 3, 0)), abs=1e-5)


def test_full_resid_pre_recovers_clean(llama, runs):
    tool = ActivationPatching(llama)
    base = tool.metric_baselines(*runs, METRIC)
    full = tool.patch_point(*runs, METRIC, "blocks.0.hook_resid_pre", over="all")
    assert full.item() == base["clean"]
    assert base["clean"] != pytest.approx(base["corrupted"])
    # position 2 is the only one that differs: patching any other position at layer 0 changes nothing
    grid = tool.patch_layers(*runs, METRIC)
    assert grid[0, 2].item() == pytest.approx(base["clean"], abs=1e-5)
    assert torch.allclose(grid[0, [0, 1, 3, 4, 5]], torch.tensor(base["corrupted"]), atol=1e-5)


def test_probability_metric(llama, runs):
    clean, _ = runs
    with torch.no_grad():
        logits = llama(clean)
    want = logits[:, -1].softmax(-1)[[0, 1], [5, 6]].mean()
    assert float(target_prob([5, 6])(logits)) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("name", ["hook_logits", "ln_final.hook_normalized"])
def test_attribution_exact_where_metric_is_linear(llama, runs, name):
    """The logit difference is linear in the logits and in the final norm's normalised input."""
    tool = ActivationPatching(llama)
    real = tool.patch_point(*runs, METRIC, name) - tool.metric_baselines(*runs, METRIC)["corrupted"]
    approx = tool.attribute_point(*runs, METRIC, name)
    assert torch.allclose(approx, real, atol=1e-4), (approx, real)
    assert real.abs().max() > 1e-3


def test_attribution_close_on_resid(llama, runs):
    """Non-linear case: report the correlation of attribution and real patching on the resid grid."""
    tool = ActivationPatching(llama)
    real = tool.patch_layers(*runs, METRIC) - tool.metric_baselines(*runs, METRIC)["corrupted"]
    approx = tool.attribute_layers(*runs, METRIC)
    corr = torch.corrcoef(torch.stack([real.flatten(), approx.flatten()]))[0, 1]
    print(f"resid_pre attribution vs patching correlation: {corr:.4f}")
    assert corr > 0.5
    heads = tool.attribute_heads(*runs, METRIC, per_position=True)
    assert heads.shape == (llama.cfg.n_layers, 6, llama.cfg.n_heads)


def test_errors(llama, runs):
    tool = ActivationPatching(llama)
    with pytest.raises(ValueError, match="head dimension"):
        tool.patch_point(*runs, METRIC, "blocks.0.hook_resid_pre", over="head")
    with pytest.raises(ValueError, match="same shape"):
        tool.patch_layers(runs[0], runs[1][:, :4], METRIC)
    with pytest.raises(ValueError, match="resid_pre"):
        tool.patch_layers(*runs, METRIC, site="resid")
