"""SparseAutoencoder against the SAE equations computed plainly from its raw tensors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from mechscope.sae import SAE, SAEConfig
from tests.sae_utils import random_weights, topk_reference

D_IN, D_SAE, K = 12, 48, 5


def make_sae(cfg: SAEConfig, seed: int = 0) -> tuple[SAE, dict[str, torch.Tensor]]:
    weights = random_weights(cfg.d_in, cfg.d_sae, seed, threshold=cfg.architecture in ("jumprelu", "batchtopk"))
    sae = SAE(cfg)
    sae.load_state_dict(weights)
    return sae.eval(), weights


def inputs(seed: int = 1) -> torch.Tensor:
    return 1.5 * torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(seed)) + 0.3


def relu_reference(pre, w):
    return pre.clamp(min=0)


def topk_ref(pre, w):
    return topk_reference(pre, K)


def threshold_reference(pre, w):
    return torch.where(pre > w["threshold"], pre.clamp(min=0), torch.zeros_like(pre))


ARCHITECTURES = {
    "relu": (None, relu_reference),
    "topk": (K, topk_ref),
    "jumprelu": (None, threshold_reference),
    "batchtopk": (3.5, threshold_reference),  # eval mode: the per-latent threshold, like jumprelu
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encode_decode_forward_match_the_equations(architecture):
    k, reference = ARCHITECTURES[architecture]
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, architecture, k))
    x = inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    latents = reference(pre, w)
    recon = latents @ w["W_dec"] + w["b_dec"]
    assert 0 < (latents > 0).sum() < latents.numel()
    assert_close(sae.encode(x), latents)
    assert_close(sae.decode(latents), recon)
    assert_close(sae(x), recon)
    out = sae.forward_with_latents(x)
    assert_close(out.pre_acts, pre)
    assert_close(out.latents, latents)
    assert_close(out.reconstruction, recon)


def test_topk_applies_relu_after_choosing():
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, "topk", K))
    with torch.no_grad():
        sae.b_enc -= 3.0  # push many pre-activations below 0, so some tokens have negatives among their top k
    x = inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + (w["b_enc"] - 3.0)
    latents = sae.encode(x)
    assert_close(latents, topk_reference(pre, K))
    active = (latents > 0).sum(-1)
    assert active.max() == K and active.min() < K


def test_batchtopk_selects_over_the_batch_in_training_mode():
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, "batchtopk", 3.5))
    x = inputs()
    positive = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).clamp(min=0)
    n_keep = int(3.5 * 15)
    cutoff = positive.flatten().sort(descending=True).values[n_keep - 1]
    sae.train()
    latents = sae.encode(x)
    assert_close(latents, torch.where(positive >= cutoff, positive, torch.zeros_like(positive)))
    assert (latents > 0).sum() == n_keep
    assert len(set((latents > 0).sum(-1).flatten().tolist())) > 1  # tokens get different counts


def test_jumprelu_below_zero_threshold_still_applies_relu():
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, "jumprelu"))
    with torch.no_grad():
        sae.threshold.fill_(-0.5)
    x = inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert ((pre > -0.5) & (pre < 0)).any()
    assert_close(sae.encode(x), pre.clamp(min=0))


def _layer_norm(x):
    mu = x.mean(-1, keepdim=True)
    std = (((x - mu) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()  # unbiased, as OpenAI's LN
    return (x - mu) / (std + 1e-5), lambda out: out * std + mu


def _norm_rescale(x):
    coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
    return x * coeff, lambda out: out / coeff


def _fixed_scale(x):
    return x * 2.5, lambda out: out / 2.5


NORMALIZATIONS = {
    "layer_norm": ({}, _layer_norm),
    "constant_norm_rescale": ({}, _norm_rescale),
    "expected_average_only_in": ({"scaling_factor": 2.5}, _fixed_scale),
}


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_input_normalisation(normalization):
    extra, normalize = NORMALIZATIONS[normalization]
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, normalize_activations=normalization, **extra))
    x = inputs()
    x_n, undo = normalize(x)
    latents = ((x_n - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).clamp(min=0)
    recon = undo(latents @ w["W_dec"] + w["b_dec"])
    assert_close(sae.encode(x), latents)
    assert_close(sae(x), recon)
    assert_close(sae.decode(latents, x=x), recon)
    if normalization == "expected_average_only_in":
        assert_close(sae.decode(latents), recon)  # a fixed factor needs no input
    else:
        with pytest.raises(ValueError, match="pass x= to decode"):
            sae.decode(latents)


def test_b_dec_not_subtracted_from_the_input():
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, "jumprelu", apply_b_dec_to_input=False))
    x = inputs()
    pre = x @ w["W_enc"] + w["b_enc"]
    latents = threshold_reference(pre, w)
    assert_close(sae.encode(x), latents)
    assert_close(sae(x), latents @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sparse_encode_and_decode_equal_the_dense_ones(architecture):
    k, _ = ARCHITECTURES[architecture]
    sae, _ = make_sae(SAEConfig(D_IN, D_SAE, architecture, k, normalize_activations="layer_norm"))
    x = inputs()
    dense = sae.encode(x)
    indices, values = sae.encode_sparse(x)
    expected_width = K if architecture == "topk" else int((dense != 0).sum(-1).max())
    assert indices.shape == values.shape == (3, 5, expected_width)
    assert indices.dtype == torch.int64
    assert_close(torch.zeros_like(dense).scatter_add(-1, indices, values), dense)
    assert_close(sae.decode_sparse(indices, values, x=x), sae.decode(dense, x=x))
    assert_close(sae(x), sae.decode(dense, x=x))


def test_sparse_encode_of_no_tokens():
    sae, _ = make_sae(SAEConfig(D_IN, D_SAE))
    indices, values = sae.encode_sparse(torch.zeros(0, D_IN))
    assert indices.shape == values.shape == (0, 1)
    assert sae.decode_sparse(indices, values).shape == (0, D_IN)


def test_decoder_rows_normalised_and_gradient_made_orthogonal():
    sae, _ = make_sae(SAEConfig(D_IN, D_SAE, "topk", K))
    with pytest.raises(RuntimeError, match="backward"):
        sae.remove_parallel_decoder_grad_()
    old = sae.W_dec.detach().clone()
    sae.normalize_decoder_()
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    assert_close(sae.W_dec.detach(), old / old.norm(dim=-1, keepdim=True))

    sae.train()
    sae(inputs()).pow(2).sum().backward()
    grad, w = sae.W_dec.grad.clone(), sae.W_dec.detach()
    sae.remove_parallel_decoder_grad_()
    expected = torch.stack([g - (g @ row) / (row @ row) * row for g, row in zip(grad, w, strict=True)])
    assert_close(sae.W_dec.grad, expected)
    assert ((sae.W_dec.grad * w).sum(-1).abs() <= 1e-6 * grad.norm(dim=-1)).all()
    assert grad.abs().sum() > 0 and sae.W_enc.grad is not None and sae.b_enc.grad is not None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architecture": "gated"}, "architecture 'gated' is not one of"),
        ({"architecture": "topk"}, r"k must be an int in \[1, d_sae=48\]"),
        ({"architecture": "topk", "k": 49}, r"\[1, d_sae=48\]"),
        ({"architecture": "batchtopk", "k": 0}, "mean active latents"),
        ({"k": 4}, "only used by topk and batchtopk"),
        ({"normalize_activations": "whiten"}, "normalize_activations 'whiten' is not one of"),
        ({"normalize_activations": "expected_average_only_in"}, "positive scaling_factor"),
        ({"scaling_factor": 2.0}, "leave it None"),
        ({"dtype": "int8"}, "unsupported SAE dtype 'int8'"),
        ({"d_in": 0}, "d_in must be a positive int"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, **fields})


def test_cfg_follows_the_weights_and_keeps_its_shape():
    sae, w = make_sae(SAEConfig(D_IN, D_SAE, "topk", K, model_name="gpt2"))
    assert SAEConfig(D_IN, D_SAE, dtype=torch.bfloat16).dtype == "bfloat16"
    sae.to(torch.float64)
    assert sae.cfg.dtype == "float64" and sae.cfg.device == "cpu"
    x = inputs()
    pre = (x.double() - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()
    assert_close(sae.encode(x), topk_reference(pre, K))  # float32 input is cast to the SAE's dtype
    sae.cfg = replace(sae.cfg, hook_name="blocks.1.hook_resid_post")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "gpt2"
    with pytest.raises(ValueError, match="must keep d_in=12"):
        sae.cfg = replace(sae.cfg, d_in=13)
    assert "architecture='topk', k=5" in repr(sae)


def test_new_sae_has_unit_decoder_rows_and_tied_encoder():
    sae = SAE(SAEConfig(D_IN, D_SAE, "jumprelu"))
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and sae.W_enc.is_contiguous()
    assert not sae.threshold.any() and isinstance(sae.threshold, torch.nn.Parameter)
    assert "threshold" in dict(SAE(SAEConfig(D_IN, D_SAE, "batchtopk", 2)).named_buffers())
