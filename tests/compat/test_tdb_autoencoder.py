"""mechscope.compat.tdb.Autoencoder and AutoencoderContext against the OpenAI formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechscope.compat.tdb import Autoencoder, AutoencoderConfig, AutoencoderContext, TiedTranspose, TopK

from .tdb_utils import openai_state_dict, reference, reference_part


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
    assert ae.n_latents == 40 and ae.to_sae().cfg.architecture == "relu"


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
    assert again.to_sae().cfg.k == 3


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


def test_constructor_initialises_as_transformer_debugger():
    """``Autoencoder(n_latents=, n_inputs=)`` builds the same parameters and buffers, drawn in the same order, as
    TDB's class (the reference file holds TDB's autoencoder made after ``torch.manual_seed(1234)``)."""
    tdb = reference_part("ae")
    torch.manual_seed(1234)
    ae = Autoencoder(n_latents=10, n_inputs=tdb["pre_bias"].shape[0])
    ours = {k: v for k, v in ae.state_dict().items() if isinstance(v, torch.Tensor)}
    assert ours.keys() == tdb.keys()  # exactly the entries TDB's strict load_state_dict expects
    for key, value in tdb.items():
        assert torch.equal(ours[key], value), key
    assert isinstance(ae.encoder.weight, torch.nn.Parameter) and isinstance(ae.decoder.weight, torch.nn.Parameter)
    assert ae.state_dict()["activation"] == "ReLU" and ae.state_dict()["activation_state_dict"] == {}
    again = Autoencoder.from_state_dict({**tdb, "activation": "ReLU"}, strict=True)  # TDB's file loads strictly
    x = torch.randn(3, ae.n_inputs)
    torch.testing.assert_close(again.encode(x), ae.encode(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing \\['latents_mean_square'\\]"):
        Autoencoder.from_state_dict({k: v for k, v in tdb.items() if k != "latents_mean_square"}, strict=True)


def test_encoder_weight_is_a_parameter_with_its_own_gradient():
    ae = Autoencoder(n_latents=6, n_inputs=4)
    x = torch.randn(5, 4)
    latents = ae.encode(x)
    (latents * torch.arange(6.0)).sum().backward()
    active = (latents > 0).float() * torch.arange(6.0)  # d loss / d pre-activation
    torch.testing.assert_close(ae.encoder.weight.grad, active.T @ (x - ae.pre_bias.detach()))
    torch.testing.assert_close(ae.latent_bias.grad, active.sum(0))
    tied = Autoencoder(n_latents=6, n_inputs=4, tied=True)
    assert tied.decoder.weight.shape == (4, 6) and torch.equal(tied.decoder.weight, tied.encoder.weight.T)
    assert set(tied.state_dict()) >= {"encoder.weight", "decoder.linear.weight"}
    back = Autoencoder.from_state_dict(tied.state_dict())
    assert isinstance(back.decoder, TiedTranspose)
    torch.testing.assert_close(back(x)[2], tied(x)[2])


def test_topk_follows_openai_sparse_autoencoder_not_tdbs_copy():
    """A TopK file: mechscope's values are openai/sparse_autoencoder's own (inputs normalised, the reconstruction
    scaled back); Transformer Debugger's copy of the class does not normalise, and gives other latents."""
    ref = reference()
    state = {
        **reference_part("topk/state"),
        "activation": "TopK",
        "activation_state_dict": {"k": int(ref["topk/k"]), "postact_fn": "ReLU"},
    }
    ae = Autoencoder.from_state_dict(state, strict=True)
    assert ae.normalize and isinstance(ae.activation, TopK)
    with torch.no_grad():
        pre, latents, recons = ae(ref["topk/x"])
    openai, tdb = reference_part("topk/openai"), reference_part("topk/tdb")
    torch.testing.assert_close(pre, openai["pre_act"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(latents, openai["latents"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(recons, openai["recons"], rtol=1e-6, atol=1e-6)
    assert (latents - tdb["latents"]).abs().max() > 0.1  # TDB's copy, un-normalised, differs
    x, info = ae.preprocess(ref["topk/x"])
    torch.testing.assert_close(ae.decode(ae.encode(ref["topk/x"]), info), recons)  # OpenAI's decode(latents, info)
    # the OpenAI classes' own TopK state_dict() repeats the config as activation.k / activation.postact_fn
    quirky = {**state, "activation.k": state["activation_state_dict"]["k"], "activation.postact_fn": "ReLU"}
    torch.testing.assert_close(Autoencoder.from_state_dict(quirky, strict=True).encode(x), ae.encode(x))


def test_sae_conversions_keep_the_values():
    ae = Autoencoder.from_state_dict(openai_state_dict(16, 40, seed=7, topk=5))
    x = 2 * torch.randn(6, 16) + 0.5
    sae = ae.to_sae()
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.normalize_activations) == ("topk", 5, "layer_norm")
    out = sae.forward_with_latents(x)
    with torch.no_grad():
        pre, latents, recons = ae(x)
    torch.testing.assert_close(out.pre_acts, pre)
    torch.testing.assert_close(out.latents, latents)
    torch.testing.assert_close(out.reconstruction, recons)
    back = Autoencoder.from_sae(sae)  # the weights and the activation; an SAE holds no latent statistics
    for name, value in ae.named_parameters():
        assert torch.equal(value, dict(back.named_parameters())[name]), name
    assert (back.normalize, back.state_dict()["activation_state_dict"]) == (True, {"k": 5, "postact_fn": "ReLU"})
