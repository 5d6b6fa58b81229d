"""evaluate_sae: every metric against the same quantity computed by hand from a full-batch run, plus closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mechscope.sae import SAEConfig, SparseAutoencoder, evaluate_sae
from tests.conftest import torch_hook_count
from tests.sae.test_splice import D_MODEL, HOOK, clean_activation, random_relu_sae, relu_reference


@pytest.fixture
def eval_tokens() -> Tensor:
    return torch.randint(0, 50256, (5, 10), generator=torch.Generator().manual_seed(7))


def ce_by_hand(logits: Tensor, tokens: Tensor) -> float:
    """Mean next-token cross-entropy over every prediction of the batch."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))


def replaced(model, tokens: Tensor, value) -> Tensor:
    """Logits with the activation at HOOK replaced by ``value(x)``."""
    return model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: value(x))])


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_metric_by_hand(request, family, eval_tokens):
    model = request.getfixturevalue(family)
    sae = random_relu_sae()
    sae.b_enc.data[:4] = -100.0  # four latents can never fire
    result = evaluate_sae(model, sae, tokens=eval_tokens, batch_size=2, dense_threshold=0.3, bins=20, progress=False)

    x = clean_activation(model, eval_tokens).reshape(-1, D_MODEL).double()
    z, x_hat = relu_reference(sae, x.float())
    x_hat = x_hat.double()
    n = x.shape[0]
    assert result.n_tokens == n == 50
    assert result.hook_name == HOOK
    assert result.l0 == pytest.approx(float((z != 0).sum()) / n, rel=1e-9)
    sq_err = float((x - x_hat).pow(2).sum())
    assert result.fvu == pytest.approx(sq_err / float((x - x.mean(dim=0)).pow(2).sum()), rel=1e-5)
    assert result.mse == pytest.approx(sq_err / x.numel(), rel=1e-5)
    cos = (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1))
    assert result.cosine == pytest.approx(float(cos.mean()), rel=1e-5)

    clean = model(eval_tokens)
    with_sae = replaced(model, eval_tokens, lambda act: relu_reference(sae, act)[1])
    zero = replaced(model, eval_tokens, torch.zeros_like)
    ce_clean, ce_sae, ce_zero = (ce_by_hand(lg, eval_tokens) for lg in (clean, with_sae, zero))
    assert (result.ce_clean, result.ce_sae, result.ce_zero) == pytest.approx((ce_clean, ce_sae, ce_zero), rel=1e-5)
    assert result.ce_recovered == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-4)
    p, q = clean.double().softmax(-1), with_sae.double().softmax(-1)
    assert result.kl == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-4)

    freq = (z != 0).double().mean(dim=0)
    assert torch.equal(result.firing_counts, (z != 0).sum(dim=0))
    assert result.dead_share == pytest.approx(float((freq == 0).double().mean())) and result.dead_share >= 4 / 96
    assert result.dense_share == pytest.approx(float((freq > 0.3).double().mean()))
    assert 0 < result.dense_share < 1 - result.dead_share
    counts, edges = np.histogram(np.log10(freq[freq > 0].numpy()), bins=20, range=(math.log10(1 / 50), 0))
    np.testing.assert_array_equal(result.density.counts, counts)
    np.testing.assert_allclose(result.density.bin_edges, edges)
    assert result.density.n_dead == int((freq == 0).sum()) == 96 - counts.sum()
    assert torch_hook_count(model) == 0

    # batching does not change the numbers: the loss and variance sums combine exactly
    whole = evaluate_sae(model, sae, tokens=eval_tokens, batch_size=64, progress=False)
    for key in ("l0", "fvu", "mse", "cosine", "ce_clean", "ce_sae", "ce_zero", "kl"):
        assert getattr(whole, key) == pytest.approx(getattr(result, key), rel=1e-5), key


def exact_sae(d: int) -> SparseAutoencoder:
    """relu SAE with W_enc = [I, -I], W_dec = [I; -I], zero biases: relu(x) - relu(-x) = x, exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, hook_name=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@torch.no_grad()
def test_exact_reconstruction(llama, eval_tokens):
    result = evaluate_sae(llama, exact_sae(D_MODEL), HOOK, eval_tokens, progress=False)  # issue 4's order
    assert result.fvu == 0 and result.mse == 0
    assert result.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.ce_sae == result.ce_clean and result.ce_recovered == 1.0
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.l0 == D_MODEL  # each dimension is carried by exactly one of its two latents (no exact zeros)
    assert result.dead_share == 0.0


@torch.no_grad()
def test_zero_sae_is_zero_ablation(llama, eval_tokens):
    sae = random_relu_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    result = evaluate_sae(llama, sae, tokens=eval_tokens, progress=False)
    assert result.ce_sae == result.ce_zero and result.ce_recovered == 0.0
    x = clean_activation(llama, eval_tokens).reshape(-1, D_MODEL).double()
    assert result.fvu == pytest.approx(float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert result.cosine == 0.0
    assert result.kl > 0


@torch.no_grad()
def test_texts_of_different_lengths_mask_the_padding(llama):
    texts = ["The cat sat on the mat.", "Hi there", "A longer sentence, with punctuation; and more words."]
    sae = random_relu_sae()
    result = evaluate_sae(llama, sae, tokens=texts, batch_size=2, progress=False)
    # by hand: each text alone (no padding at all), the tokens pooled
    xs, zs, kls, losses = [], [], [], []
    for text in texts:
        ids = llama.to_tokens(text)
        x = clean_activation(llama, ids)[0]
        xs.append(x)
        zs.append(relu_reference(sae, x)[0])
        clean = llama(ids)[0]
        with_sae = replaced(llama, ids, lambda act: relu_reference(sae, act)[1])[0]
        losses.append(F.cross_entropy(clean[:-1], ids[0, 1:], reduction="sum"))
        p, log_q = clean.double().log_softmax(-1), with_sae.double().log_softmax(-1)
        kls.append((p.exp() * (p - log_q)).sum(-1))
    x, z = torch.cat(xs).double(), torch.cat(zs)
    x_hat = (z @ sae.W_dec + sae.b_dec).double()
    assert result.n_tokens == x.shape[0] == sum(len(t) for t in texts)  # byte tokenizer: one token per byte
    assert result.l0 == pytest.approx(float((z != 0).sum()) / x.shape[0])
    assert result.fvu == pytest.approx(float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    n_pred = sum(len(t) - 1 for t in texts)
    assert result.ce_clean == pytest.approx(float(sum(losses)) / n_pred, rel=1e-5)
    assert result.kl == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)


@torch.no_grad()
def test_density_plot(llama, eval_tokens, tmp_path):
    result = evaluate_sae(llama, random_relu_sae(), tokens=eval_tokens, progress=False)
    assert set(result.to_dict()) >= {"l0", "fvu", "ce_recovered", "kl", "dead_share", "dense_share"}
    path = result.plot_density(tmp_path / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def test_restores_sae_mode_and_checks_arguments(llama, eval_tokens):
    sae = SparseAutoencoder(SAEConfig(d_in=D_MODEL, d_sae=32, architecture="batchtopk", k=4.0, hook_name=HOOK))
    sae.train()
    evaluate_sae(llama, sae, tokens=eval_tokens, progress=False)
    assert sae.training
    with pytest.raises(TypeError, match="needs tokens"):
        evaluate_sae(llama, sae)  # type: ignore[call-overload]  # the overloads refuse it before it runs
    with pytest.raises(ValueError, match="dense_threshold"):
        evaluate_sae(llama, sae, tokens=eval_tokens, dense_threshold=2.0)
    with pytest.raises(ValueError, match="d_in=32 but the activation"):
        evaluate_sae(llama, random_relu_sae(d_in=32), tokens=eval_tokens, progress=False)
    assert torch_hook_count(llama) == 0


@torch.no_grad()
def test_special_positions_keep_their_activation_and_leave_the_metrics(llama, eval_tokens):
    tokens = eval_tokens.clone()
    bos = llama.tokenizer.bos_token_id
    tokens[:, 0] = bos
    tokens[2, 6] = bos  # one mid-sequence special token too
    sae = random_relu_sae()
    result = evaluate_sae(llama, sae, tokens=tokens, batch_size=2, progress=False)

    keep = tokens != bos
    x = clean_activation(llama, tokens)
    z, x_hat = relu_reference(sae, x[keep])
    x_kept = x[keep].double()
    assert result.n_tokens == int(keep.sum()) == 44
    assert result.l0 == pytest.approx(float((z != 0).sum()) / 44, rel=1e-9)
    sq_err = float((x_kept - x_hat.double()).pow(2).sum())
    assert result.fvu == pytest.approx(sq_err / float((x_kept - x_kept.mean(dim=0)).pow(2).sum()), rel=1e-5)

    def spliced_by_hand(act: Tensor) -> Tensor:
        out = act.clone()
        out[keep] = relu_reference(sae, act[keep])[1]
        return out

    def zeroed_by_hand(act: Tensor) -> Tensor:
        out = act.clone()
        out[keep] = 0
        return out

    clean = llama(tokens)
    with_sae, zero = replaced(llama, tokens, spliced_by_hand), replaced(llama, tokens, zeroed_by_hand)
    expected = tuple(ce_by_hand(lg, tokens) for lg in (clean, with_sae, zero))
    assert (result.ce_clean, result.ce_sae, result.ce_zero) == pytest.approx(expected, rel=1e-5)
    p, q = clean.double().softmax(-1), with_sae.double().softmax(-1)
    assert result.kl == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-4)

    everything = evaluate_sae(llama, sae, tokens=tokens, batch_size=2, exclude_special=False, progress=False)
    assert everything.n_tokens == 50 and everything.ce_sae != pytest.approx(result.ce_sae)
