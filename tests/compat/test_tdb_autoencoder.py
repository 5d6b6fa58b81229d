"""mechscope.compat.tdb.Autoencoder and AutoencoderContext against the OpenAI formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechscope.compat.tdb import Autoencoder, AutoencoderConfig, AutoencoderContext

from .tdb_utils import openai_state_dict


def test_relu_autoencoder_matches_openai_formulas():
    state = openai_state_dict(16, 40, seed=3)
    before = dict(state)
    ae = Autoencoder.from_state_dict(state, strict=False)
    assert state.keys() == before.keys()  # the caller's dict is not modified
    x = torch.randn(5, 7, 16)
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    latents = torch.relu(pre)
    recon = latents @ state["decoder.weight"].T + state["pre_bias"]
    torch.testing.assert_close(ae.encode_pre_act(x), pre)
    torch.testing.assert_close(ae.encode_pre_act(x, slice(3, 9)), pre[..., 3:9])
    torch.testing.assert_close(ae.encode(x), latents)
    torch.testing.assert_close(ae.decode(latents), recon)
    for got, want in zip(ae(x), (pre, latents, recon), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(ae.encoder.weight, state["encoder.weight"])
    torch.testing.assert_close(ae.decoder.weight, state["decoder.weight"])
    assert ae.n_latents == 40 and ae.sae.cfg.architecture == "relu"


def test_topk_autoencoder_normalises_inputs():
    state = openai_state_dict(16, 40, seed=4, topk=5)
    ae = Autoencoder.from_state_dict(state)
    x = 3 * torch.randn(6, 16) + 1
    mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    pre = ((x - mu) / (std + 1e-5) - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    top = pre.topk(5, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    recon = latents @ state["decoder.weight"].T + state["pre_bias"]
    torch.testing.assert_close(ae.encode(x), latents)
    torch.testing.assert_close(ae.decode(latents), recon)  # normalised space, as OpenAI's decode without info
    got_pre, got_latents, got_recon = ae(x)
    torch.testing.assert_close(got_pre, pre)
    torch.testing.assert_close(got_latents, latents)
    torch.testing.assert_close(got_recon, recon * std + mu)  # OpenAI scales back by std, not std + eps


def test_strict_rejects_unknown_entries():
    state = {**openai_state_dict(8, 12), "extra": torch.zeros(3)}
    assert Autoencoder.from_state_dict(state, strict=False).n_latents == 12
    with pytest.raises(ValueError, match="extra"):
        Autoencoder.from_state_dict(state, strict=True)


def test_state_dict_round_trips_through_a_safe_file(tmp_path):
    ae = Autoencoder.from_state_dict(openai_state_dict(8, 12, seed=5, topk=3))
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    again = Autoencoder.from_state_dict(torch.load(tmp_path / "ae.pt", weights_only=True))
    x = torch.randn(4, 8)
    torch.testing.assert_close(again.encode(x), ae.encode(x))
    assert again.sae.cfg.k == 3


def test_autoencoder_context_loads_per_layer_and_omits_dead_latents(tmp_path):
    paths = {}
    for layer, dead in ((0, [1, 7, 9]), (1, [2, 4])):
        state = openai_state_dict(8, 10, seed=layer)
        state["latents_activation_frequency"][dead] = 0.0
        paths[layer] = tmp_path / f"{layer}.pt"
        torch.save(state, paths[layer])
    config = AutoencoderConfig(dst="mlp_post_act", autoencoder_path_by_layer_index=paths)

    plain = AutoencoderContext(config, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="warmup"):
        _ = plain.num_autoencoder_directions
    plain.warmup()
    assert plain.num_autoencoder_directions == 10
    with pytest.raises(ValueError, match="no autoencoder for layer 5"):
        plain.get_autoencoder(5)

    ctx = AutoencoderContext(config, device=torch.device("cpu"), omit_dead_latents=True)
    ctx.warmup()
    assert ctx.num_autoencoder_directions == 8  # the fewest dead latents of any layer: 2
    x = torch.randn(3, 8)
    for layer in (0, 1):
        full, kept = plain.get_autoencoder(layer), ctx.get_autoencoder(layer)
        torch.testing.assert_close(kept.encode(x), full.encode(x)[:, :8])  # latent i is still latent i
        torch.testing.assert_close(kept.decoder.weight, full.decoder.weight[:, :8])
        assert not any(p.requires_grad for p in kept.parameters())
    torch.testing.assert_close(
        ctx.get_autoencoder(0).decode(ctx.get_autoencoder(0).encode(x)),
        F.relu(
            (x - plain.get_autoencoder(0).pre_bias) @ plain.get_autoencoder(0).encoder.weight[:8].T
            + plain.get_autoencoder(0).latent_bias[:8]
        )
        @ plain.get_autoencoder(0).decoder.weight[:, :8].T
        + plain.get_autoencoder(0).pre_bias,
    )
