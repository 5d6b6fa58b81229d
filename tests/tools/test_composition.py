"""Tool "composition": Q-, K-, V-composition scores against dense by-hand matrices."""

from __future__ import annotations

import pytest
import torch

from mechscope.tools import get_tool_class
from mechscope.tools.composition import CompositionScores
from tests.conftest import build_pair


@pytest.fixture(scope="module")
def deep():
    # 3 layers so that pairs (0 -> 1), (0 -> 2), (1 -> 2) exist; grouped-query K/V (2 kv heads for 4 heads)
    return build_pair("llama", seed=4, num_hidden_layers=3)[0]


def _dense(model, mode: str, l1: int, h1: int, l2: int, h2: int, fold_ln: bool = False) -> float:
    w_q, w_k, w_v, w_o = (w.detach().double() for w in (model.W_Q, model.W_K, model.W_V, model.W_O))
    if fold_ln:
        scale = model.ln1_w.detach().double()[:, None, :, None]
        w_q, w_k, w_v = scale * w_q, scale * w_k, scale * w_v
    ov = w_v[l1, h1] @ w_o[l1, h1]  # [d_model, d_model]
    qk = w_q[l2, h2] @ w_k[l2, h2].T
    right = {"Q": qk, "K": qk.T, "V": w_v[l2, h2] @ w_o[l2, h2]}[mode]
    return float(torch.linalg.norm(ov @ right) / (torch.linalg.norm(ov) * torch.linalg.norm(right)))


def test_registered():
    assert get_tool_class("composition") is CompositionScores


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_scores_against_dense_matrices(deep, mode):
    scores = CompositionScores(deep).composition_scores(mode)
    n_layers, n_heads = deep.cfg.n_layers, deep.cfg.n_heads
    assert scores.shape == (n_layers, n_heads, n_layers, n_heads)
    for l1, h1, l2, h2 in [(0, 0, 1, 0), (0, 3, 2, 1), (1, 2, 2, 3), (0, 1, 1, 2)]:
        assert scores[l1, h1, l2, h2].item() == pytest.approx(_dense(deep, mode, l1, h1, l2, h2), rel=1e-5)
    # only earlier -> later pairs are filled; everything else is 0
    later = torch.arange(n_layers)[:, None, None, None] < torch.arange(n_layers)[None, None, :, None]
    assert (scores[~later.expand_as(scores)] == 0).all()
    assert (scores[later.expand_as(scores)] > 0).all() and (scores <= 1).all()


def test_fold_ln(gpt2):
    scores = CompositionScores(gpt2).composition_scores("K", fold_ln=True)
    assert scores[0, 2, 1, 1].item() == pytest.approx(_dense(gpt2, "K", 0, 2, 1, 1, fold_ln=True), rel=1e-5)
    assert scores[0, 2, 1, 1].item() != pytest.approx(_dense(gpt2, "K", 0, 2, 1, 1), rel=1e-5)


def test_closed_form_aligned_orthogonal_and_silent_heads():
    # GPT-2, heads made of coordinate projections P_S (identity on the dims S, 0 elsewhere):
    # OV[0,0] = P_A and OV[1,0] = P_A give ||P_A||_F / ||P_A||_F^2 = 1/sqrt(d_head); OV[1,1] = P_B with B
    # disjoint from A gives 0; a head that writes nothing has an undefined score, NaN.
    model = build_pair("gpt2", seed=5)[0]
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    a, b = slice(0, d_head), slice(d_head, 2 * d_head)
    v = slice(2 * d_model, 3 * d_model)  # c_attn is Conv1D [d_model, 3 d_model] = [q | k | v]
    with torch.no_grad():
        for layer, reads in ((0, [a]), (1, [a, b])):
            attn = model.model.transformer.h[layer].attn
            attn.c_attn.weight[:, v] = 0
            attn.c_proj.weight.zero_()  # Conv1D [n_heads * d_head, d_model]
            for head, dims in enumerate(reads):
                cols = slice(2 * d_model + head * d_head, 2 * d_model + (head + 1) * d_head)
                attn.c_attn.weight[dims, cols] = torch.eye(d_head)
                attn.c_proj.weight[head * d_head : (head + 1) * d_head, dims] = torch.eye(d_head)
    scores = CompositionScores(model).composition_scores("V")
    assert scores[0, 0, 1, 0].item() == pytest.approx(d_head**-0.5, rel=1e-6)
    assert scores[0, 0, 1, 1].item() == 0.0
    assert scores[0, 1, 1, 0].isnan()


def test_bad_mode(llama):
    with pytest.raises(ValueError, match="use 'Q', 'K' or 'V'"):
        CompositionScores(llama).composition_scores("O")
