"""Block surgery: by-hand equivalents, hooks and caches inside, exact restoration outside."""

from __future__ import annotations

import copy

import pytest
import torch

from mechscope.tools.surgery import BlockSurgery
from tests.conftest import build_pair, torch_hook_count


@pytest.fixture(scope="module")
def model():
    return build_pair("llama", seed=4, num_hidden_layers=3)[0]


def test_delete_equals_skipping(model, tokens):
    with torch.no_grad():
        before = model(tokens)
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
        skip = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: cache["blocks.1.hook_resid_pre"])]
        )
        with BlockSurgery(model).delete(1):
            deleted = model(tokens)
            _, inner = model.run_with_cache(tokens)  # hooks still work inside
        after = model(tokens)
    assert torch.allclose(deleted, skip, atol=1e-5)
    assert "blocks.1.hook_resid_post" not in inner  # the deleted block never runs
    assert torch.allclose(inner["blocks.2.hook_resid_pre"], inner["blocks.0.hook_resid_post"])
    assert torch.equal(after, before)
    assert torch_hook_count(model) == 0


def test_permute_equals_by_hand(model, tokens):
    surgery = BlockSurgery(model)
    blocks = list(surgery.blocks)
    with torch.no_grad():
        before = model(tokens)
        _, cache = model.run_with_cache(tokens, names_filter="hook_embed")

        # by hand: feed each block the previous one's output via resid_pre replacement, in the new order
        def run_block(i, x):
            captured = {}
            model.run_with_hooks(
                tokens,
                fwd_hooks=[
                    (f"blocks.{i}.hook_resid_pre", lambda a, hook: x),
                    (f"blocks.{i}.hook_resid_post", lambda a, hook: captured.setdefault("x", a)),
                ],
            )
            return captured["x"]

        x = cache["hook_embed"]
        for i in (2, 0, 1):
            x = run_block(i, x)
        with surgery.permute([2, 0, 1]):
            assert [id(b) for b in surgery.blocks] == [id(blocks[i]) for i in (2, 0, 1)]
            _, inner = model.run_with_cache(tokens)
            out = model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)  # kv cache works inside
        after = model(tokens)
    assert torch.allclose(inner["blocks.1.hook_resid_post"], x, atol=1e-5)
    assert out.new_tokens.shape == (1, 3)
    assert torch.equal(after, before)
    assert torch_hook_count(model) == 0


def test_replace_and_restore_on_exception(model, tokens):
    surgery = BlockSurgery(model)
    blocks = list(surgery.blocks)
    with torch.no_grad():
        before = model(tokens)
        twin = copy.deepcopy(blocks[0])
        with pytest.raises(RuntimeError, match="boom"), surgery.replace({2: twin}):
            assert surgery.blocks[2] is twin
            model.run_with_cache(tokens)
            raise RuntimeError("boom")
        after = model(tokens)
    assert list(surgery.blocks) == blocks
    assert torch.equal(after, before)
    assert torch_hook_count(model) == 0


def test_errors(model):
    surgery = BlockSurgery(model)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        surgery.delete(3)
    with pytest.raises(ValueError, match="permutation"):
        surgery.permute([0, 0, 1])
    with pytest.raises(ValueError, match="deepcopy"):
        surgery.replace({1: surgery.blocks[0]})
