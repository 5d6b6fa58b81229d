"""mechscope.compat.tdb against the values Transformer Debugger's own code computed on the same weights.

``data/tdb_reference.pt`` holds a small GPT-2 in TDB's layout and what TDB's ``Transformer``, ``TransformerHooks``,
``AutoencoderHooks`` and ``Autoencoder`` gave on it (``tdb_reference.py`` regenerates it from a TDB checkout).
The façade runs the same weights as a transformers GPT-2; every location, gradient and edit is compared.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.compat.tdb import AtLayers, Autoencoder, AutoencoderHooks, TransformerHooks

from .tdb_utils import reference, reference_part, reference_transformer

LOCATIONS = [path for path, _ in TransformerHooks().locations() if path != "attn.qk_softmax_denominator"]
PER_LAYER = ("mlp.", "attn.", "resid.torso.")
TOL = {"rtol": 1e-5, "atol": 2e-5}


def _recording(store: dict, stage: str) -> TransformerHooks:
    """Hooks at every location keeping what they see as ``store[(location, layer)]``."""
    hooks = TransformerHooks()
    for path, fwd_bwd in hooks.locations():
        if path == "attn.qk_softmax_denominator":
            continue

        def keep(xx, *args, _path=path, layer=None, **kwargs):
            store[(_path, layer)] = xx.detach().clone()
            if "out_layer" in kwargs:
                store[("out_layer", layer)] = kwargs["out_layer"].weight.detach().clone()
            return xx

        getattr(fwd_bwd, f"append_{stage}")(keep)
    return hooks


def _ref_key(kind: str, path: str, layer: int | None) -> str:
    return f"{kind}/{path}/{'-' if layer is None else layer}"


def _layers(path: str) -> list[int | None]:
    return list(range(reference_transformer().cfg.n_layers)) if path.startswith(PER_LAYER) else [None]


def _real(value: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The entries at real (not padding) positions: for the attention maps ``[batch, q, k, head]`` the real
    queries (their keys at padding are masked in both), else the real positions of ``[batch, pos, ...]``."""
    return value[~pad]


def test_every_location_matches_tdb_on_a_left_padded_batch():
    xf, ref = reference_transformer(), reference()
    tokens, pad = ref["tokens/padded"], ref["tokens/pad"]
    got: dict = {}
    with torch.no_grad():
        logits, _ = xf(tokens, pad=pad, hooks=_recording(got, "fwd"))
    torch.testing.assert_close(logits[~pad], ref["logits/padded"][~pad], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(xf(ref["tokens/plain"])[0], ref["logits/plain"], **TOL)
    for path in LOCATIONS:
        for layer in _layers(path):
            want = ref[_ref_key("fwd", path, layer)]
            mine = got[(path, layer)]
            assert mine.shape == want.shape, (path, layer)
            torch.testing.assert_close(_real(mine, pad), _real(want, pad), **TOL, msg=f"{path} {layer}")
    for layer in _layers("mlp.post_act"):  # the out_layer that mlp.post_act hooks get: weight [d_model, d_ff]
        torch.testing.assert_close(got[("out_layer", layer)], ref[f"out_layer_weight/{layer}"], rtol=0, atol=0)


def test_every_backward_hook_gets_tdbs_gradient():
    xf, ref = reference_transformer(), reference()
    got: dict = {}
    xf.zero_grad()
    logits, _ = xf(ref["tokens/plain"], hooks=_recording(got, "bwd"))
    (logits * ref["bwd_weights"]).sum().backward()
    xf.zero_grad()
    for path in LOCATIONS:
        for layer in _layers(path):
            want = ref[_ref_key("bwd", path, layer)]
            torch.testing.assert_close(got[(path, layer)], want, rtol=1e-4, atol=1e-5, msg=f"{path} {layer}")


@pytest.mark.parametrize("path", LOCATIONS)
def test_an_edit_at_each_location_changes_the_logits_as_in_tdb(path):
    """``xx * 1.25 + 0.05`` at one location (at layer 2 for the per-layer ones): the edit changes the mean, so for
    the LayerNorm locations (``post_mean_subtraction``) TDB's no-second-mean-subtraction semantics is tested."""
    xf, ref = reference_transformer(), reference()
    hooks = TransformerHooks()
    edit = lambda xx, **kwargs: xx * 1.25 + 0.05  # noqa: E731
    location = dict(hooks.locations())[path]
    location.append_fwd(AtLayers(int(ref["edit_layer"])).append(edit) if path.startswith(PER_LAYER) else edit)
    with torch.no_grad():
        edited, _ = xf(ref["tokens/edit"], hooks=hooks)
        plain, _ = xf(ref["tokens/edit"])
    want = ref[f"edit/{path}"]
    torch.testing.assert_close(edited, want, **TOL)
    assert (want - plain).abs().max() > 1e-3  # the edit matters


def _ae() -> Autoencoder:
    return Autoencoder.from_state_dict({**reference_part("ae"), "activation": "ReLU"}, strict=True)


def _per_token(fn):
    return lambda x: fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)


@pytest.mark.parametrize("add_error", [True, False])
def test_autoencoder_hooks_values_and_gradients_match_tdb(add_error):
    xf, ref = reference_transformer(), reference()
    layer, tokens = int(ref["ae_layer"]), ref["tokens/plain"]
    want = reference_part(f"ae_run/{add_error}")
    ae = _ae()
    latents: dict = {}

    def keep(xx, layer, **kwargs):
        latents[layer] = xx
        return xx

    ae_hooks = AutoencoderHooks(_per_token(ae.encode), _per_token(ae.decode), add_error=add_error)
    ae_hooks.latents.append_fwd(keep)
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_fwd(AtLayers(layer).append(ae_hooks))
    xf.zero_grad()
    logits, _ = xf(tokens, hooks=hooks)
    torch.testing.assert_close(logits, want["logits"], **TOL)
    torch.testing.assert_close(latents[layer], want["latents"], **TOL)
    logits.sum().backward()
    torch.testing.assert_close(xf.xf_layers[0].mlp.in_layer.weight.grad, want["in_layer0_grad"], rtol=1e-4, atol=1e-4)
    for name, param in ae.named_parameters():
        torch.testing.assert_close(param.grad, want[f"ae_grad/{name}"], rtol=1e-4, atol=1e-4, msg=name)

    xf.zero_grad()
    xf(tokens, hooks=hooks)
    latents[layer][:, 0].sum().backward()
    torch.testing.assert_close(
        xf.xf_layers[0].mlp.in_layer.weight.grad, want["latent0_in_layer0_grad"], rtol=1e-4, atol=1e-5
    )
    xf.zero_grad()


@pytest.mark.parametrize("add_error", [True, False])
@pytest.mark.parametrize("ablate", [False, True])
def test_latent_ablation_matches_tdb(add_error, ablate):
    xf, ref = reference_transformer(), reference()
    layer = int(ref["ae_layer"])
    ae = _ae()
    with torch.no_grad():
        ae.latent_bias.copy_(ref["ae_ablation/latent_bias"])
    seen: dict = {}

    def ablate_latent(xx, layer, **kwargs):
        xx[:, :, 1] = 0
        return xx

    def keep_max(xx, layer, **kwargs):
        seen[layer] = xx.max()
        return xx

    ae_hooks = AutoencoderHooks(_per_token(ae.encode), _per_token(ae.decode), add_error=add_error)
    if ablate:
        ae_hooks.latents.append_fwd(ablate_latent)
    hooks = TransformerHooks()
    hooks.mlp.post_act.append_all(AtLayers(layer).append(ae_hooks).append(keep_max))
    with torch.no_grad():
        logits, _ = xf(ref["tokens/plain"], hooks=hooks)
    torch.testing.assert_close(logits, ref[f"ae_ablation/{add_error}/{ablate}/logits"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(seen[layer], ref[f"ae_ablation/{add_error}/{ablate}/post_act_max"], rtol=1e-5, atol=1e-4)
