"""Tool "logit_lens": the last layer is the model's output; a middle layer by hand from the weights."""

from __future__ import annotations

import pytest
import torch

from mechscope.tools import get_tool_class
from mechscope.tools.logit_lens import LogitLens
from tests.conftest import build_pair


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def model(request):
    return build_pair(request.param, seed=3)[0]


def test_registered():
    assert get_tool_class("logit_lens") is LogitLens


def test_last_layer_is_the_models_output(model, tokens):
    lens = LogitLens(model)
    last = model.cfg.n_layers - 1
    labels, logits = lens.layer_logits(tokens, layers=[last], position=None)
    assert labels == [f"blocks.{last}.hook_resid_post"]
    with torch.no_grad():
        expected = model(tokens)
    torch.testing.assert_close(logits[0], expected.float(), atol=1e-4, rtol=1e-4)
    out = lens.logit_lens(tokens, target_ids=7, k=3, layers=[last])
    torch.testing.assert_close(out["probs"][0], expected[:, -1].softmax(-1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out["target_prob"][0], expected[:, -1].softmax(-1)[:, 7], atol=1e-6, rtol=1e-4)


def test_middle_layer_by_hand(model, tokens):
    m = model
    _, cache = m.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    x = cache["blocks.0.hook_resid_post"][:, 5].double()  # [batch, d_model]
    config = m.model.config
    if m.cfg.normalization_type == "LN":
        eps = config.layer_norm_epsilon
        x = x - x.mean(-1, keepdim=True)
        normed = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    else:
        normed = x / (x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps).sqrt()
    logits = (normed * m.ln_final_w.double() + m.ln_final_b.double()) @ m.W_U.double() + m.b_U.double()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    probs = logits.softmax(-1)
    target = torch.tensor([11, 200])
    out = LogitLens(m).logit_lens(tokens, target_ids=target, k=4, position=5, layers=[0])
    torch.testing.assert_close(out["probs"][0].double(), probs, atol=1e-6, rtol=1e-4)
    p_target = probs[[0, 1], target]
    torch.testing.assert_close(out["target_prob"][0].double(), p_target, atol=1e-6, rtol=1e-4)
    assert out["target_rank"][0].tolist() == [int((probs[b] > p_target[b]).sum()) for b in range(2)]
    assert out["top_k_ids"][0].tolist() == probs.argsort(-1, descending=True)[:, :4].tolist()
    assert out["top_k_tokens"][0][1] == [m.tokenizer.decode([t]) for t in out["top_k_ids"][0, 1].tolist()]


def test_sites_in_forward_order_and_rank_of_the_top_token(llama, tokens):
    lens = LogitLens(llama)
    out = lens.logit_lens(tokens, k=1, sites=["resid_post", "resid_pre"])
    assert out["labels"] == [
        f"blocks.{i}.hook_{s}" for i in range(llama.cfg.n_layers) for s in ("resid_pre", "resid_post")
    ]
    top = out["top_k_ids"][..., 0]  # [n_points, batch]
    ranked = lens.logit_lens(tokens, target_ids=top[2], sites=["resid_post", "resid_pre"])
    assert ranked["target_rank"][2].tolist() == [0, 0]
    # blocks.1.hook_resid_pre is blocks.0.hook_resid_post
    torch.testing.assert_close(out["probs"][1], out["probs"][2])


def test_errors_name_the_fix(llama, gpt2, tokens):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        LogitLens(llama).logit_lens(tokens, layers=[2])
    with pytest.raises(ValueError, match="choose among"):
        LogitLens(llama).logit_lens(tokens, sites=["resid"])
    with pytest.raises(KeyError, match="unknown hook point"):  # parallel blocks have no resid_mid
        LogitLens(build_pair("gpt_neox")[0]).logit_lens(tokens, sites="resid_mid")
