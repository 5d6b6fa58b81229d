"""Issue 13: every malformed input to a hooked model gets an error that names the fix; valid forms read the same."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mechscope import HookedAutoConfig

ACCEPTED = "accepted: a str, a list of str, an integer torch tensor"


def test_every_integer_form_of_the_same_ids_gives_the_same_logits(llama):
    ids = [5, 17, 300, 50256]
    want = llama(torch.tensor([ids]))
    for same in (torch.tensor(ids), np.array(ids), np.array([ids], dtype=np.int32), ids, [np.int64(i) for i in ids]):
        assert torch.equal(llama(same), want)
    assert torch.equal(llama.to_tokens(np.array([ids, ids], dtype=np.uint16)), torch.tensor([ids, ids]))


@pytest.mark.parametrize(
    ("bad", "kind", "fix"),
    [
        (torch.tensor([[1.7, 2.2]]), TypeError, "convert with .long()"),
        (torch.tensor([[True, False]]), TypeError, "convert with .long()"),
        (np.array([[1.0, 2.0]]), TypeError, ACCEPTED),
        (b"hi", TypeError, "decode the bytes to a str"),
        ([True, False], TypeError, ACCEPTED),
        ([1, "a"], TypeError, ACCEPTED),
        (3.5, TypeError, ACCEPTED),
        (torch.ones(2, 2, 3, dtype=torch.long), ValueError, "reshape to [batch, pos]"),
        (torch.tensor(5), ValueError, "reshape(1, 1)"),
    ],
    ids=["float", "bool", "numpy-float", "bytes", "list-of-bool", "mixed-list", "float-scalar", "3-D", "0-D"],
)
def test_unreadable_token_input_is_refused_listing_the_accepted_forms(llama, bad, kind, fix):
    for call in (llama, llama.to_tokens, lambda x: llama.generate(x, max_new_tokens=1)):
        with pytest.raises(kind, match=re.escape(fix)):
            call(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.tensor([[1, 50257]]), r"token id 50257 at \[batch 0, pos 1\] .* 50257 ids, valid ids are 0..50256"),
        ([1, -3], r"token id -3 at \[batch 0, pos 1\] .* valid ids are 0..50256"),
        ([], "empty list; pass at least one"),
        (torch.zeros(1, 0, dtype=torch.long), r"shape \(1, 0\) is empty"),
        ("", "has no tokens .* pass a non-empty text or prepend_bos=True"),
        (["ab", ""], "text 1 .* has no tokens"),
        (torch.zeros(1, 513, dtype=torch.long), r"513 tokens is longer than the model's context n_ctx = 512; truncate"),
    ],
    ids=[
        "id-past-vocab",
        "negative-id",
        "empty-list",
        "empty-tensor",
        "empty-prompt",
        "one-empty-prompt",
        "past-n_ctx",
    ],
)
def test_ids_out_of_range_empty_and_too_long_inputs_name_the_limit(llama, bad, message):
    with pytest.raises(ValueError, match=message):
        llama(bad)


def test_generate_refuses_a_prompt_plus_continuation_past_n_ctx(llama):
    with pytest.raises(ValueError, match=r"500 tokens [+] 20 new tokens .* n_ctx = 512; lower max_new_tokens"):
        llama.generate(torch.zeros(1, 500, dtype=torch.long), max_new_tokens=20)
    assert (
        llama.generate(torch.zeros(1, 500, dtype=torch.long), max_new_tokens=12, do_sample=False).tokens.shape[1] <= 512
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.long(), r"returned dtype torch.int64, but the activation has dtype torch.float32: .*out.to"),
        (lambda t: t.double(), r"returned dtype torch.float64, but the activation has dtype torch.float32"),
        (lambda t: t.to("meta"), r"returned device meta, but the activation has device cpu"),
        (lambda t: t[..., :3], r"returned shape \(1, 2, 3\), but the activation has shape \(1, 2, 64\)"),
    ],
    ids=["int64", "float64", "device", "shape"],
)
def test_a_hook_returning_another_dtype_device_or_shape_is_named(llama, edit, message):
    def my_edit(t, hook):
        return edit(t)

    with pytest.raises(ValueError, match=f"hook 'my_edit' on blocks.0.hook_resid_post {message}"):
        llama.run_with_hooks("hi", fwd_hooks=[("blocks.0.hook_resid_post", my_edit)])


def test_a_backward_hook_of_the_wrong_shape_or_dtype_is_reported_under_its_own_name(llama):
    def my_grad_edit(grad, hook):
        return grad[..., :3]

    def my_grad_cast(grad, hook):
        return grad.double()

    for fn, message in ((my_grad_edit, r"shape \(1, 2, 3\), but the gradient has shape"), (my_grad_cast, "dtype")):
        loss = llama.run_with_hooks("hi", bwd_hooks=[("blocks.0.hook_resid_post", fn)]).sum()
        with pytest.raises(ValueError, match=f"hook '{fn.__name__}' on blocks.0.hook_resid_post returned {message}"):
            loss.backward()
    llama.zero_grad(set_to_none=True)  # the refused backward left gradients in the later layers of the shared model


def test_a_predicate_matching_no_hook_point_is_an_error_listing_names(llama):
    def typo(name):
        return name.endswith("hook_resid_middle")

    with pytest.raises(ValueError, match=r"'typo' matches no hook point .*blocks.0.hook_resid_pre.*model.hook_names"):
        llama.run_with_cache("hi", names_filter=typo)
    with pytest.raises(ValueError, match="'typo' matches no hook point"):
        llama.run_with_hooks("hi", fwd_hooks=[(typo, lambda t, hook: None)])
    _, cache = llama.run_with_cache("hi", names_filter=lambda n: n.endswith("hook_resid_mid"))
    assert sorted(cache.keys()) == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]


@pytest.mark.parametrize("bad", [1.0, "1", True])
def test_stop_at_layer_must_be_an_int(llama, bad):
    with pytest.raises(TypeError, match=r"stop_at_layer must be an int in -2..2 \(or None"):
        llama("hi", stop_at_layer=bad)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0, got 2.5"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an int >= 1 or None"),
        (dict(top_k=0), "top_k must be an int >= 1 or None"),
    ],
    ids=[
        "neg-max-new",
        "float-max-new",
        "neg-temperature",
        "nan-temperature",
        "top_p>1",
        "top_p=0",
        "top_k<0",
        "top_k=0",
    ],
)
@pytest.mark.parametrize("do_sample", [True, False])
def test_generate_refuses_invalid_settings_even_when_greedy(llama, settings, message, do_sample):
    with pytest.raises(ValueError, match=message):
        llama.generate("hi", do_sample=do_sample, **{"max_new_tokens": 1, **settings})


def test_generate_with_zero_new_tokens_returns_the_prompt(llama):
    out = llama.generate("hi", max_new_tokens=0)
    assert torch.equal(out.tokens, llama.to_tokens("hi")) and out.new_tokens.shape == (1, 0)


def test_hooked_auto_config_refuses_a_field_transformers_does_not_know():
    with pytest.raises(TypeError, match=r"LlamaConfig has no field num_layerz [(]did you mean num_hidden_layers"):
        HookedAutoConfig("llama", num_layerz=3)
    config = HookedAutoConfig("llama", num_hidden_layers=3, tie_word_embeddings=True)  # its own and PretrainedConfig's
    assert config.num_hidden_layers == 3 and config.tie_word_embeddings
