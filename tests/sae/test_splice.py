"""Splicing an SAE into a model: each hook checked against the same edit written out by hand as a plain hook."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from mechscope.sae import SAEConfig, SAESplice, SparseAutoencoder, splice_sae, spliced
from tests.conftest import torch_hook_count
from tests.sae_utils import random_weights, topk_reference

HOOK = "blocks.0.hook_resid_post"
D_MODEL, D_SAE = 64, 96


def random_relu_sae(
    seed: int = 3, hook_name: str | None = HOOK, d_in: int = D_MODEL, architecture: str = "relu"
) -> SparseAutoencoder:
    """A relu (or topk, k=8) SAE with random weights, so that latents fire on some tokens and not others."""
    k = 8 if architecture == "topk" else None
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=D_SAE, architecture=architecture, k=k, hook_name=hook_name))
    sae.load_state_dict(random_weights(d_in, D_SAE, seed))
    return sae


def relu_reference(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(latents, reconstruction)`` of a relu or topk SAE without normalisation, from its raw weights."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = topk_reference(pre, sae.cfg.k) if sae.cfg.architecture == "topk" else pre.relu()
    return z, z @ sae.W_dec + sae.b_dec


def clean_activation(model, tokens: Tensor, hook_name: str = HOOK) -> Tensor:
    return model.run_with_cache(tokens, names_filter=hook_name)[1][hook_name]


def often_firing_latent(sae: SparseAutoencoder, x: Tensor) -> int:
    """The latent active on the most tokens of ``x`` (so ablating it changes something)."""
    z, _ = relu_reference(sae, x)
    return int((z > 0).sum(dim=(0, 1)).argmax())


@torch.no_grad()
def test_error_term_leaves_output_unchanged(llama, tokens):
    sae = random_relu_sae()
    clean = llama(tokens)
    with spliced(llama, sae, include_error=True):
        assert torch.equal(llama(tokens), clean)  # nothing edited: the activation is left exactly as it was
    read = []
    with spliced(llama, sae, include_error=True, latent_hooks=[lambda z, hook: read.append(z.clone())]):
        out = llama(tokens)  # a reading latent hook takes the decode path: x + (decode(z) - sae(x))
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(read[0], relu_reference(sae, clean_activation(llama, tokens))[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(("family", "architecture"), [("llama", "relu"), ("gpt2", "relu"), ("llama", "topk")])
def test_without_error_equals_reconstruction_by_hand(request, family, architecture, tokens):
    model = request.getfixturevalue(family)
    sae = random_relu_sae(architecture=architecture)
    expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: relu_reference(sae, x)[1])])
    with spliced(model, sae) as splice:
        assert isinstance(splice, SAESplice)
        out = model(tokens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, model(tokens), atol=1e-3)  # the splice did change the output
    # the same hooks as a plain fwd_hooks list
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=splice_sae(model, sae)), expected, atol=1e-5, rtol=0
    )


@torch.no_grad()
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_ablating_a_latent_with_error_term_subtracts_its_decoder_row(llama, tokens, architecture):
    sae = random_relu_sae(architecture=architecture)
    x = clean_activation(llama, tokens)
    j = often_firing_latent(sae, x)
    z_j = relu_reference(sae, x)[0][..., j : j + 1]
    assert (z_j > 0).sum() > 5
    expected = llama.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: act - z_j * sae.W_dec[j])])

    def ablate(z: Tensor, hook) -> None:
        z[..., j] = 0.0  # in place

    with spliced(llama, sae, include_error=True, latent_hooks=[ablate]):
        out = llama(tokens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, llama(tokens), atol=1e-3)


@torch.no_grad()
def test_steering_adds_alpha_times_decoder_row(llama, tokens):
    sae = random_relu_sae()
    j, alpha = 5, 3.0
    expected = llama.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: act + alpha * sae.W_dec[j])])
    splice = splice_sae(llama, sae, include_error=True)
    splice.add_latent_hook(lambda z, hook: z + alpha * torch.nn.functional.one_hot(torch.tensor(j), D_SAE))
    out = llama.run_with_hooks(tokens, fwd_hooks=splice)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_latent_hook_sees_its_name_and_cache_holds_every_stage(llama, tokens):
    sae = random_relu_sae()
    x = clean_activation(llama, tokens)
    z_ref, recon_ref = relu_reference(sae, x)
    names = []

    def double(z: Tensor, hook) -> Tensor:
        names.append((hook.name, hook.layer()))
        return 2 * z

    with spliced(llama, sae, latent_hooks=[double], cache=True) as splice:
        llama(tokens)
    assert names == [(f"{HOOK}.hook_sae_acts_post", 0)]
    assert splice.latent_hook_name == f"{HOOK}.hook_sae_acts_post"
    cache = splice.cache
    assert set(cache) == {f"{HOOK}.hook_sae_{s}" for s in ("input", "acts_post", "recons", "error")}
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], x, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], 2 * z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], 2 * z_ref @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_error"], x - recon_ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_with_splice(llama):
    sae = random_relu_sae()
    prompt = torch.tensor([[3, 17, 99, 4, 250]])
    clean = llama.generate(prompt, max_new_tokens=6, do_sample=False)
    with_error = llama.generate(
        prompt, max_new_tokens=6, do_sample=False, fwd_hooks=splice_sae(llama, sae, include_error=True)
    )
    assert torch.equal(with_error.tokens, clean.tokens)
    by_hand = llama.generate(
        prompt, max_new_tokens=6, do_sample=False, fwd_hooks=[(HOOK, lambda x, hook: relu_reference(sae, x)[1])]
    )
    no_error = llama.generate(prompt, max_new_tokens=6, do_sample=False, fwd_hooks=splice_sae(llama, sae))
    assert torch.equal(no_error.tokens, by_hand.tokens)


@torch.no_grad()
def test_hooks_removed_even_after_errors(llama, tokens):
    sae = random_relu_sae()
    assert torch_hook_count(llama) == 0
    with spliced(llama, sae):
        assert torch_hook_count(llama) > 0
    assert torch_hook_count(llama) == 0
    with pytest.raises(RuntimeError, match="inside the block"), spliced(llama, sae):
        raise RuntimeError("inside the block")
    assert torch_hook_count(llama) == 0

    def broken(z, hook):
        raise RuntimeError("latent hook failed")

    with pytest.raises(RuntimeError, match="latent hook failed"), spliced(llama, sae, latent_hooks=[broken]):
        llama(tokens)
    assert torch_hook_count(llama) == 0
    with pytest.raises(ValueError, match=r"returned shape \(2, 12, 3\)"):
        llama.run_with_hooks(tokens, fwd_hooks=splice_sae(llama, sae, latent_hooks=[lambda z, hook: z[..., :3]]))
    assert torch_hook_count(llama) == 0


@torch.no_grad()
def test_d_in_mismatch_names_both_sizes_and_the_hook(llama, tokens):
    sae = random_relu_sae(d_in=32)
    with pytest.raises(ValueError, match=rf"d_in=32 but the activation at {HOOK} has size 64"), spliced(llama, sae):
        llama(tokens)
    assert torch_hook_count(llama) == 0
    # a hook point of the right size works: mlp.hook_post is [batch, pos, d_mlp=256]
    wide = SparseAutoencoder(SAEConfig(d_in=256, d_sae=8))
    with spliced(llama, wide, hook_name="blocks.1.mlp.hook_post", include_error=True):
        torch.testing.assert_close(llama(tokens), llama.run_with_hooks(tokens), atol=0, rtol=0)


def test_hook_name_defaults_and_errors(llama):
    assert splice_sae(llama, random_relu_sae()).hook_name == HOOK
    sae = random_relu_sae(hook_name=None)
    with pytest.raises(ValueError, match="pass hook_name="):
        splice_sae(llama, sae)
    assert splice_sae(llama, sae, hook_name="blocks.1.hook_resid_pre").fwd_hooks[0][0] == "blocks.1.hook_resid_pre"
    sae.cfg = dataclasses.replace(sae.cfg, hook_name="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        splice_sae(llama, sae)
    with pytest.raises(KeyError, match="Closest valid names"):
        splice_sae(llama, sae, hook_name="blocks.0.hook_resid_psot")
