"""Latent attribution and ablation against the same quantities computed plainly with hooks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.sae import SAE, SAEConfig
from mechscope.sae.attribution import ablate, attribute_latents
from tests.sae_utils import random_weights


def make_sae(model, hook_name: str, seed: int = 0) -> SAE:
    d = model.cfg.d_model
    sae = SAE(SAEConfig(d, 4 * d, "relu", hook_name=hook_name))
    sae.load_state_dict(random_weights(d, 4 * d, seed))
    return sae.eval()


@pytest.fixture(params=["gpt2", "llama"])
def model(request, gpt2, llama):
    return {"gpt2": gpt2, "llama": llama}[request.param]


def test_direct_effects_add_up_to_the_logit_at_the_last_residual(model):
    # at the final residual, logit_t = apply_ln(x) * w @ W_U[:, t] + b @ W_U[:, t] + b_U[t] with the cached scale,
    # and x = sum_i a_i W_dec[i] + b_dec + error: the latents' direct effects are the sum's latent part
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    sae = make_sae(model, hook)
    tokens = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    target = 17
    att = attribute_latents(model, sae, tokens, target, position=4)
    _, cache = model.run_with_cache(tokens, names_filter=[hook, "ln_final.hook_scale"])
    x = cache[hook][0, 4]
    rest = x - (att.activations[:, None] * sae.W_dec.detach()[att.latents]).sum(0)  # b_dec + error
    if model.cfg.normalization_type == "LN":
        rest = rest - rest.mean()
    with torch.no_grad():
        rest_effect = (rest / cache["ln_final.hook_scale"][0, 4]) * model.ln_final_w @ model.W_U[:, target]
        bias = model.ln_final_b @ model.W_U[:, target] + model.b_U[target]
    logits = model(tokens).detach()
    assert att.logit == pytest.approx(float(logits[0, 4, target]), abs=1e-5)
    assert float(att.direct_effects.sum() + rest_effect + bias) == pytest.approx(att.logit, abs=1e-4)
    assert_close(att.write_norms, att.activations.abs() * sae.W_dec.detach()[att.latents].norm(dim=-1))
    dense = sae.encode(x)
    assert set(att.latents.tolist()) == set((dense != 0).nonzero()[:, 0].tolist())


def test_gradient_times_activation_equals_the_decoder_direction_dotted_with_the_hook_gradient(model):
    hook = "blocks.0.hook_resid_post"
    sae = make_sae(model, hook, seed=1)
    tokens = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    att = attribute_latents(model, sae, tokens, target=3, position=-1, hook_name=hook)
    grads = {}

    def keep(g, h):
        grads["x"] = g

    with torch.enable_grad():
        model.run_with_hooks(tokens, bwd_hooks=[(hook, keep)])[0, -1, 3].backward()
    model.zero_grad(set_to_none=True)
    want = att.activations * (sae.W_dec.detach()[att.latents] @ grads["x"][0, -1])
    assert_close(att.grad_x_act, want, atol=1e-5, rtol=1e-4)


def test_ablating_latents_heads_and_neurons_equals_plain_hooks(model):
    hook = "blocks.1.hook_resid_mid"
    sae = make_sae(model, hook, seed=2)
    tokens = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(2))
    dense = sae.encode(model.run_with_cache(tokens, names_filter=hook)[1][hook])
    chosen = (dense[0, -1] != 0).nonzero()[:3, 0].tolist()

    def remove_latents(x, h):  # with the error term kept, ablation removes exactly a_i W_dec[i]
        z = sae.encode(x)[..., chosen]
        return x - z @ sae.W_dec.detach()[chosen]

    def zero_head(z, h):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def zero_neurons(t, h):
        t = t.clone()
        t[..., [2, 5]] = 0
        return t

    result = ablate(model, tokens, 9, sae=sae, latents=chosen, heads=[(0, 1)], neurons=[(1, 2), (1, 5)])
    with torch.no_grad():
        plain = model.run_with_hooks(
            tokens,
            fwd_hooks=[
                (hook, remove_latents),
                ("blocks.0.attn.hook_z", zero_head),
                ("blocks.1.mlp.hook_post", zero_neurons),
            ],
        )[0, -1]
        clean = model(tokens)[0, -1]
    assert result.ablated_logit == pytest.approx(float(plain[9]), abs=1e-4)
    assert result.clean_logit == pytest.approx(float(clean[9]), abs=1e-6)
    assert result.ablated_prob == pytest.approx(float(plain.softmax(-1)[9]), abs=1e-5)
    assert torch.equal(result.clean_top[0], clean.softmax(-1).topk(10).indices)
    assert result.ablated_logit != pytest.approx(result.clean_logit, abs=1e-3)


def test_bad_input_names_the_fix(gpt2):
    sae = make_sae(gpt2, "blocks.0.hook_resid_post")
    too_long = torch.zeros(1, gpt2.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="n_ctx"):
        attribute_latents(gpt2, sae, too_long, 0)
    with pytest.raises(ValueError, match="pass sae="):
        ablate(gpt2, torch.zeros(1, 3, dtype=torch.long), 0, latents=[1])


def test_latents_that_do_not_write_the_residual_have_no_direct_effect(gpt2):
    d = gpt2.cfg.n_heads * gpt2.cfg.d_head
    sae = SAE(SAEConfig(d, 2 * d, "relu", hook_name="blocks.0.attn.hook_z"))
    sae.load_state_dict(random_weights(d, 2 * d, 3))
    att = attribute_latents(gpt2, sae.eval(), torch.arange(1, 6)[None], target=2)
    assert att.latents.numel() > 0 and att.direct_effects.isnan().all() and att.grad_x_act.isfinite().all()


def test_ablating_units_that_do_not_exist_names_the_ranges(gpt2):
    sae = make_sae(gpt2, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="does not exist"):
        ablate(gpt2, torch.zeros(1, 3, dtype=torch.long), 0, heads=[(0, gpt2.cfg.n_heads)])
    with pytest.raises(ValueError, match="must be in"):
        ablate(gpt2, torch.zeros(1, 3, dtype=torch.long), 0, sae=sae, latents=[sae.cfg.d_sae])
