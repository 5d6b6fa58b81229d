"""SAEs at per-head hook points (``attn.hook_z`` ...): the activation ``[batch, pos, head, d_head]`` is read as one
``[head * d_head]`` vector per token, heads outer (SAELens's convention), in splicing, evaluation and the store."""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.data import ActivationStore
from mechscope.sae import evaluate_sae, spliced
from tests.conftest import torch_hook_count
from tests.sae.test_splice import clean_activation, random_relu_sae, relu_reference

Z = "blocks.0.attn.hook_z"  # tiny llama: 4 heads x 16 = 64 wide


def by_hand(sae, z: Tensor) -> Tensor:
    """The reconstruction of ``z [batch, pos, head, d_head]``, flattened by hand (head-major) and shaped back."""
    b, p, h, d = z.shape
    return relu_reference(sae, z.reshape(b, p, h * d))[1].reshape(b, p, h, d)


@torch.no_grad()
def test_splicing_at_hook_z_flattens_the_heads(llama, tokens):
    sae = random_relu_sae(hook_name=Z, d_in=64)
    expected = llama.run_with_hooks(tokens, fwd_hooks=[(Z, lambda z, hook: by_hand(sae, z))])
    with spliced(llama, sae, cache=True) as splice:
        got = llama(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    z = clean_activation(llama, tokens, Z)
    assert splice.cache[f"{Z}.hook_sae_input"].shape == (*z.shape[:2], 64)
    torch.testing.assert_close(splice.cache[f"{Z}.hook_sae_recons"], by_hand(sae, z).flatten(-2), atol=1e-5, rtol=0)
    with spliced(llama, sae, include_error=True):
        assert torch.equal(llama(tokens), llama.run_with_hooks(tokens, fwd_hooks=[]))
    assert torch_hook_count(llama) == 0


@torch.no_grad()
def test_evaluate_at_hook_z(llama, tokens):
    sae = random_relu_sae(hook_name=Z, d_in=64)
    result = evaluate_sae(llama, sae, tokens=tokens, exclude_special=False, progress=False)
    x = clean_activation(llama, tokens, Z).flatten(-2).reshape(-1, 64).double()
    x_hat = relu_reference(sae, x.float())[1].double()
    assert abs(result.fvu - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())) < 1e-5
    spliced_logits = llama.run_with_hooks(tokens, fwd_hooks=[(Z, lambda z, hook: by_hand(sae, z))])
    ce = torch.nn.functional.cross_entropy(spliced_logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(result.ce_sae - float(ce)) < 1e-5


def test_store_keeps_one_vector_per_token_at_per_head_points(llama):
    store = ActivationStore(llama, [Z, "blocks.0.attn.hook_k"], context_length=16, batch_contexts=2)
    _, _, rows = next(store.stream(progress=False))
    contexts = torch.stack(list(store.contexts())[:2])
    tok = llama.tokenizer
    keep = ~torch.isin(contexts, torch.tensor([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]))
    _, cache = llama.run_with_cache(contexts, names_filter=[Z, "blocks.0.attn.hook_k"])
    assert torch.equal(rows[Z], cache[Z][keep].flatten(-2))  # [rows, 4 * 16]
    assert torch.equal(rows["blocks.0.attn.hook_k"], cache["blocks.0.attn.hook_k"][keep].flatten(-2))  # 2 kv heads
    assert rows["blocks.0.attn.hook_k"].shape[-1] == 32
