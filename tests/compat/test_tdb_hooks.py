"""Transformer Debugger's own ``neuron_explainer/tests/test_hooks.py``, rewritten for mechscope.compat.tdb.

Each case makes the assertions of TDB's case of the same name, with only the imports changed (``neuron_explainer
.models`` -> ``mechscope.compat.tdb``). TDB's file runs on GPT-2 small; these run on the small GPT-2 whose weights
``tdb_reference.py`` stores, on which that script checked that TDB's own cases pass. Each case seeds torch as the
script did for TDB's case, so the randomly initialised autoencoders are the same ones (same initialisation).
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from mechscope.compat.tdb import Autoencoder, Transformer
from mechscope.compat.tdb.hooks import AtLayers, AutoencoderHooks, Hooks, TransformerHooks

from .tdb_utils import reference_transformer

AE_LAYER, N_LATENTS = 4, 10


def get_test_model() -> Transformer:
    return reference_transformer()


def tokens_of(model: Transformer) -> torch.Tensor:
    return torch.arange(5, device=model.device)[None, :]


def per_token(fn):
    """``fn`` on ``[batch * pos, d]``, called with ``[batch, pos, d]`` (TDB's ``unflatten``)."""

    def on_tokens(x):
        return fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)

    return on_tokens


def autoencoder_hooks(autoencoder: Autoencoder, add_error: bool = False) -> AutoencoderHooks:
    return AutoencoderHooks(per_token(autoencoder.encode), per_token(autoencoder.decode), add_error=add_error)


def recorder(store: dict, detach: bool = True):
    def record(xx, layer, **kwargs):
        store[layer] = xx.detach().clone() if detach else xx
        return xx

    return record


def test_forward_backward_hooks():
    torch.manual_seed(0)
    model = get_test_model()
    n_layers = model.cfg.n_layers
    seen_fwd, seen_bwd = {}, {}
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_fwd(recorder(seen_fwd))
    hooks.mlp.post_act.append_bwd(recorder(seen_bwd))
    tokens = tokens_of(model)
    model.zero_grad()
    logits, _ = model.forward(tokens, hooks=hooks)
    logits.sum().backward()
    d_ff = model.xf_layers[0].mlp.out_layer.weight.shape[1]
    assert list(seen_fwd) == list(range(n_layers))
    assert seen_fwd[0].shape == (*tokens.shape, d_ff)
    assert list(seen_bwd) == list(range(n_layers))[::-1]  # gradients arrive from the last layer back
    assert seen_bwd[0].shape == (*tokens.shape, d_ff)
    model.zero_grad()


def test_autoencoder_hooks():
    torch.manual_seed(1)
    model = get_test_model()
    autoencoder = Autoencoder(n_latents=N_LATENTS, n_inputs=model.cfg.d_ff).to(model.device)
    tokens = tokens_of(model)

    latents: dict = {}
    every_layer = autoencoder_hooks(autoencoder)
    every_layer.latents.append_fwd(recorder(latents))
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_fwd(every_layer)
    model.forward(tokens, hooks=hooks)
    assert list(latents) == list(range(model.cfg.n_layers))
    assert latents[0].shape == (*tokens.shape, N_LATENTS)

    latents = {}
    one_layer = autoencoder_hooks(autoencoder)
    one_layer.latents.append_fwd(recorder(latents))
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_fwd(AtLayers(AE_LAYER).append(one_layer))
    model.forward(tokens, hooks=hooks)
    assert list(latents) == [AE_LAYER]
    assert latents[AE_LAYER].shape == (*tokens.shape, N_LATENTS)

    latents = {}
    on_gradient = autoencoder_hooks(autoencoder)  # as a backward hook: it encodes the gradient
    on_gradient.latents.append_fwd(recorder(latents))
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_bwd(AtLayers(AE_LAYER).append(on_gradient))
    model.zero_grad()
    logits, _ = model.forward(tokens, hooks=hooks)
    logits.sum().backward()
    assert list(latents) == [AE_LAYER]
    assert latents[AE_LAYER].shape == (*tokens.shape, N_LATENTS)
    model.zero_grad()


@pytest.mark.parametrize("add_error", [True, False])
def test_autoencoder_backward_hooks(add_error):
    """A backward pass started from a latent reaches the first layer's MLP input weights."""
    torch.manual_seed(2 if add_error else 3)
    model = get_test_model()
    autoencoder = Autoencoder(n_latents=N_LATENTS, n_inputs=model.cfg.d_ff).to(model.device)
    latents: dict = {}
    ae_hooks = autoencoder_hooks(autoencoder, add_error)
    ae_hooks.latents.append_fwd(recorder(latents, detach=False))
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_fwd(AtLayers(AE_LAYER).append(ae_hooks))
    model.zero_grad()
    model.forward(tokens_of(model), hooks=hooks)
    assert model.xf_layers[0].mlp.in_layer.weight.grad is None
    latents[AE_LAYER][:, 0].sum().backward()
    assert model.xf_layers[0].mlp.in_layer.weight.grad is not None
    model.zero_grad()


@pytest.mark.parametrize("add_error", [True, False])
def test_autoencoder_hooks_ablation(add_error):
    """A latent with a huge bias dominates the reconstruction; ablating it (or adding the error back) undoes that."""
    torch.manual_seed(4 if add_error else 5)
    model = get_test_model()
    autoencoder = Autoencoder(n_latents=N_LATENTS, n_inputs=model.cfg.d_ff).to(model.device)
    latent = 1
    autoencoder.latent_bias.data[latent] = +1000
    tokens = tokens_of(model)

    def ablate(latents, layer, **kwargs):
        latents[:, :, latent] = 0
        return latents

    for ablated in (False, True):
        post_act: dict = {}
        ae_hooks = autoencoder_hooks(autoencoder, add_error)
        if ablated:
            ae_hooks.latents.append_fwd(ablate)
        hooks = TransformerHooks()
        hooks.mlp.post_act.append_all(AtLayers(AE_LAYER).append(ae_hooks).append(recorder(post_act)))
        model.forward(tokens, hooks=hooks)
        post_act_max = post_act[AE_LAYER].max().item()
        # large exactly when the huge latent reaches the MLP: not ablated and not cancelled by the error term,
        # or ablated with the error term, which then adds the unablated latent's contribution back
        if ablated != add_error:
            assert post_act_max < 100
        else:
            assert post_act_max > 100


def test_autoencoder_hooks_add_error():
    """With add_error the hooked model is the model (forward and gradients); without it, it is not. Either way
    the autoencoder's own encoder weight gets a gradient."""
    torch.manual_seed(6)
    model = get_test_model()
    autoencoder = Autoencoder(n_latents=N_LATENTS, n_inputs=model.cfg.d_ff).to(model.device)
    tokens = tokens_of(model)
    for add_error in (True, False):
        hooks = TransformerHooks()
        hooks.mlp.post_act.append_fwd(AtLayers(AE_LAYER).append(autoencoder_hooks(autoencoder, add_error)))
        autoencoder.zero_grad()
        assert autoencoder.encoder.weight.grad is None

        model.zero_grad()
        hooked, _ = model.forward(tokens, hooks=hooks)
        hooked.sum().backward()
        hooked_grad = model.xf_layers[0].mlp.in_layer.weight.grad.clone()

        model.zero_grad()
        plain, _ = model.forward(tokens)
        plain.sum().backward()
        plain_grad = model.xf_layers[0].mlp.in_layer.weight.grad.clone()

        assert add_error == torch.allclose(hooked, plain, atol=1e-3, rtol=1e-5)
        assert add_error == torch.allclose(hooked_grad, plain_grad, atol=1.0, rtol=1e-1)
        assert autoencoder.encoder.weight.grad is not None
    model.zero_grad()


def test_hook_copy():
    torch.manual_seed(7)
    for make in (TransformerHooks, Hooks):
        hooks = make()
        copied = deepcopy(hooks)
        hooks.bind(layer=0)
        copied.bind(layer=1)  # the copy has its own bound keywords

    at_layers = AtLayers(0)
    assert deepcopy(at_layers).condition == at_layers.condition

    autoencoder = Autoencoder(n_latents=10, n_inputs=5)
    ae_hooks = autoencoder_hooks(autoencoder)
    assert deepcopy(ae_hooks).encode == ae_hooks.encode
