"""Regenerate ``tests/compat/data/tdb_reference.pt``: the values of Transformer Debugger's own code.

The TDB façade tests (``tests/compat/test_tdb_reference.py``) compare mechscope with these values, produced by
OpenAI Transformer Debugger's ``Transformer``, ``TransformerHooks``, ``AutoencoderHooks`` and ``Autoencoder``
(``neuron_explainer/models``) and by openai/sparse_autoencoder's ``Autoencoder`` on the same small random weights,
which the file also holds. Neither project is on PyPI, so this script is run by hand, with checkouts of both:

    python3.11 -m venv /tmp/venv-tdb && /tmp/venv-tdb/bin/pip install torch==2.13.0 pytest
    /tmp/venv-tdb/bin/python tests/compat/tdb_reference.py --tdb TDB_CHECKOUT --sae SPARSE_AUTOENCODER_CHECKOUT

TDB's model code needs torch and numpy only. Its ``Transformer`` asks tiktoken for the vocabulary size (and the
checkpoint helpers import aiohttp); neither is used here, so both modules are replaced by stand-ins that give the
small vocabulary of these weights. The script imports nothing of mechscope. Before it writes the file it runs
TDB's own ``neuron_explainer/tests/test_hooks.py`` cases on these weights: the assertions that mechscope's rewrite
of that file makes hold for Transformer Debugger itself on the same model.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

N_VOCAB, CTX, D_MODEL, N_LAYERS, N_HEADS, M_MLP = 48, 16, 16, 6, 2, 4
EDIT_LAYER, AE_LAYER, N_LATENTS = 2, 4, 10
OUT = Path(__file__).parent / "data" / "tdb_reference.pt"


def _edit(xx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The edit applied at one location at a time: it changes the mean, so LayerNorm's centring matters."""
    return xx * 1.25 + 0.05


def _import_references(tdb: Path, sae: Path) -> tuple[types.ModuleType, ...]:
    tiktoken = types.ModuleType("tiktoken")
    tiktoken.get_encoding = lambda name: types.SimpleNamespace(n_vocab=N_VOCAB)  # type: ignore[attr-defined]
    sys.modules["tiktoken"] = tiktoken
    sys.modules["aiohttp"] = types.ModuleType("aiohttp")
    sys.path[:0] = [str(tdb), str(sae)]
    import neuron_explainer.models.autoencoder as tdb_autoencoder
    import neuron_explainer.models.hooks as tdb_hooks
    import neuron_explainer.models.transformer as tdb_transformer
    import sparse_autoencoder.model as openai_sae

    return tdb_transformer, tdb_hooks, tdb_autoencoder, openai_sae


def _random_model(tdb_transformer: types.ModuleType) -> Any:
    """TDB's GPT-2 architecture with seeded weights; the unembedding is the token embedding (GPT-2 ties them)."""
    cfg = tdb_transformer.TransformerConfig(
        enc="gpt2", ctx_window=CTX, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, m_mlp=M_MLP
    )
    model = tdb_transformer.Transformer(cfg, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:  # a linear layer's weight [out, in]
                p.copy_(noise / p.shape[1] ** 0.5)
        model.unembed.weight.copy_(model.tok_embed.weight)
    return model.eval()


def _leaves(collection: Any, fwd_bwd_type: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (dotted path, FwdBwdHooks) location of a TDB hook tree."""
    out = []
    for name, child in collection.all_hooks.items():
        if isinstance(child, fwd_bwd_type):
            out.append((prefix + name, child))
        else:
            out += _leaves(child, fwd_bwd_type, prefix + name + ".")
    return out


def _locations(tdb_hooks: types.ModuleType) -> list[str]:
    paths = [path for path, _ in _leaves(tdb_hooks.TransformerHooks(), tdb_hooks.FwdBwdHooks)]
    return [p for p in paths if p != "attn.qk_softmax_denominator"]  # hooking it changes TDB's softmax path


def _hook_at(tdb_hooks: types.ModuleType, path: str, fn: Any, stage: str = "fwd", layer: int | None = None) -> Any:
    hooks = tdb_hooks.TransformerHooks()
    for path_, fwd_bwd in _leaves(hooks, tdb_hooks.FwdBwdHooks):
        if path_ == path:
            wrapped = fn if layer is None else tdb_hooks.AtLayers(layer).append(fn)
            getattr(fwd_bwd, f"append_{stage}")(wrapped)
    return hooks


def _unflatten(f: Any) -> Any:
    return lambda x: f(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)


def _store_all(tdb_hooks: types.ModuleType, locations: list[str], store: dict, kind: str, stage: str) -> Any:
    """One TransformerHooks with a hook at every location that keeps a copy of its value (or gradient)."""
    hooks = tdb_hooks.TransformerHooks()
    leaves = dict(_leaves(hooks, tdb_hooks.FwdBwdHooks))
    for path in locations:

        def keep(xx: torch.Tensor, *args: Any, _path: str = path, layer: int | None = None, **kwargs: Any):
            store[f"{kind}/{_path}/{'-' if layer is None else layer}"] = xx.detach().clone()
            if "out_layer" in kwargs and stage == "fwd":
                store[f"out_layer_weight/{layer}"] = kwargs["out_layer"].weight.detach().clone()
            return xx

        getattr(leaves[path], f"append_{stage}")(keep)
    return hooks


def _transformer_values(model: Any, tdb_hooks: types.ModuleType, out: dict) -> None:
    locations = _locations(tdb_hooks)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, N_VOCAB, (2, 6), generator=gen)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, :2] = True
    tokens[pad] = 0
    plain = torch.arange(5)[None, :]
    out.update({"tokens/padded": tokens, "tokens/pad": pad, "tokens/plain": plain})

    with torch.no_grad():
        out["logits/plain"] = model(plain)[0]
        out["logits/padded"], _ = model(tokens, pad=pad, hooks=_store_all(tdb_hooks, locations, out, "fwd", "fwd"))
        edit_tokens = torch.randint(0, N_VOCAB, (2, 6), generator=gen)
        out["tokens/edit"] = edit_tokens
        for path in locations:
            layer = EDIT_LAYER if path.startswith(("mlp.", "attn.", "resid.torso.")) else None
            out[f"edit/{path}"] = model(edit_tokens, hooks=_hook_at(tdb_hooks, path, _edit, layer=layer))[0]

    weights = torch.randn(1, 5, N_VOCAB, generator=gen)
    out["bwd_weights"] = weights
    logits, _ = model(plain, hooks=_store_all(tdb_hooks, locations, out, "bwd", "bwd"))
    (logits * weights).sum().backward()
    model.zero_grad()


def _autoencoder_values(model: Any, tdb_hooks: types.ModuleType, tdb_autoencoder: types.ModuleType, out: dict):
    torch.manual_seed(1234)
    ae = tdb_autoencoder.Autoencoder(n_latents=N_LATENTS, n_inputs=model.cfg.d_ff)
    out.update({f"ae/{k}": v.detach().clone() for k, v in ae.state_dict().items() if isinstance(v, torch.Tensor)})
    plain = out["tokens/plain"]
    for add_error in (True, False):
        latents: dict = {}

        def keep_latents(xx: torch.Tensor, layer: int, _store: dict = latents, **kwargs: Any) -> torch.Tensor:
            _store[layer] = xx
            return xx

        ae_hooks = tdb_hooks.AutoencoderHooks(_unflatten(ae.encode), _unflatten(ae.decode), add_error=add_error)
        ae_hooks.latents.append_fwd(keep_latents)
        hooks = tdb_hooks.TransformerHooks()
        hooks.mlp.post_act.append_fwd(tdb_hooks.AtLayers(AE_LAYER).append(ae_hooks))
        model.zero_grad()
        ae.zero_grad()
        logits, _ = model(plain, hooks=hooks)
        tag = f"ae_run/{add_error}"
        out[f"{tag}/logits"] = logits.detach().clone()
        out[f"{tag}/latents"] = latents[AE_LAYER].detach().clone()
        logits.sum().backward()
        out[f"{tag}/in_layer0_grad"] = model.xf_layers[0].mlp.in_layer.weight.grad.clone()
        for name, p in ae.named_parameters():
            out[f"{tag}/ae_grad/{name}"] = p.grad.clone()

        model.zero_grad()
        logits, _ = model(plain, hooks=hooks)
        latents[AE_LAYER][:, 0].sum().backward()
        out[f"{tag}/latent0_in_layer0_grad"] = model.xf_layers[0].mlp.in_layer.weight.grad.clone()
    model.zero_grad()

    ae.latent_bias.data[1] = 1000
    out["ae_ablation/latent_bias"] = ae.latent_bias.detach().clone()
    with torch.no_grad():
        for add_error in (True, False):
            for ablate in (False, True):
                seen: dict = {}

                def ablate_latent(xx: torch.Tensor, layer: int, **kwargs: Any) -> torch.Tensor:
                    xx[:, :, 1] = 0
                    return xx

                def keep_max(xx: torch.Tensor, layer: int, _seen: dict = seen, **kwargs: Any) -> torch.Tensor:
                    _seen[layer] = xx.max()
                    return xx

                ae_hooks = tdb_hooks.AutoencoderHooks(_unflatten(ae.encode), _unflatten(ae.decode), add_error)
                if ablate:
                    ae_hooks.latents.append_fwd(ablate_latent)
                hooks = tdb_hooks.TransformerHooks()
                hooks.mlp.post_act.append_all(tdb_hooks.AtLayers(AE_LAYER).append(ae_hooks).append(keep_max))
                logits, _ = model(plain, hooks=hooks)
                out[f"ae_ablation/{add_error}/{ablate}/logits"] = logits.clone()
                out[f"ae_ablation/{add_error}/{ablate}/post_act_max"] = seen[AE_LAYER].clone()


def _topk_values(tdb_autoencoder: types.ModuleType, openai_sae: types.ModuleType, out: dict) -> None:
    """A TopK state dict read by openai/sparse_autoencoder (inputs normalised) and by TDB's copy (not)."""
    gen = torch.Generator().manual_seed(2)
    d_in, n_latents, k = 12, 30, 4
    state = {
        "pre_bias": 0.1 * torch.randn(d_in, generator=gen),
        "latent_bias": 0.1 * torch.randn(n_latents, generator=gen),
        "encoder.weight": torch.randn(n_latents, d_in, generator=gen) / d_in**0.5,
        "decoder.weight": torch.randn(d_in, n_latents, generator=gen) / n_latents**0.5,
        "stats_last_nonzero": torch.zeros(n_latents, dtype=torch.long),
        "latents_activation_frequency": torch.rand(n_latents, generator=gen),
        "latents_mean_square": torch.zeros(n_latents),
    }
    x = 3 * torch.randn(7, d_in, generator=gen) + 1
    out.update({f"topk/state/{key}": value for key, value in state.items()})
    out["topk/k"], out["topk/x"] = torch.tensor(k), x
    for name, module in (("openai", openai_sae), ("tdb", tdb_autoencoder)):
        full = {**state, "activation": "TopK", "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}
        ae = module.Autoencoder.from_state_dict(full, strict=True)
        with torch.no_grad():
            pre, latents, recons = ae(x)
        out.update({f"topk/{name}/pre_act": pre, f"topk/{name}/latents": latents, f"topk/{name}/recons": recons})


def _run_tdb_test_file(tdb: Path, model: Any) -> None:
    """TDB's own test_hooks.py on these weights (its get_test_model loads GPT-2 small from the network)."""
    spec = importlib.util.spec_from_file_location("tdb_test_hooks", tdb / "neuron_explainer/tests/test_hooks.py")
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    tests.get_test_model = lambda: model  # type: ignore[attr-defined]
    cases = [(tests.test_forward_backward_hooks, {}), (tests.test_autoencoder_hooks, {})]
    cases += [(f, {"add_error": e}) for f in (tests.test_autoencoder_backward_hooks,) for e in (True, False)]
    cases += [(tests.test_autoencoder_hooks_ablation, {"add_error": e}) for e in (True, False)]
    cases += [(tests.test_autoencoder_hooks_add_error, {}), (tests.test_hook_copy, {})]
    for seed, (case, kwargs) in enumerate(cases):
        torch.manual_seed(seed)
        case(**kwargs)
        model.zero_grad()
    print(f"Transformer Debugger passes its own {len(cases)} test_hooks.py cases on these weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tdb", type=Path, required=True, help="a checkout of openai/transformer-debugger")
    parser.add_argument("--sae", type=Path, required=True, help="a checkout of openai/sparse_autoencoder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tdb_transformer, tdb_hooks, tdb_autoencoder, openai_sae = _import_references(args.tdb, args.sae)
    model = _random_model(tdb_transformer)
    out: dict[str, torch.Tensor] = {
        f"weights/{k}": v.detach().clone() for k, v in model.state_dict().items() if k != "unembed.weight"
    }
    out["config"] = torch.tensor([N_VOCAB, CTX, D_MODEL, N_LAYERS, N_HEADS, model.cfg.d_ff])
    out["edit_layer"], out["ae_layer"] = torch.tensor(EDIT_LAYER), torch.tensor(AE_LAYER)
    _transformer_values(model, tdb_hooks, out)
    _autoencoder_values(model, tdb_hooks, tdb_autoencoder, out)
    _topk_values(tdb_autoencoder, openai_sae, out)
    _run_tdb_test_file(args.tdb, model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in sorted(out.items())}, args.out)
    print(f"wrote {len(out)} tensors to {args.out}")


if __name__ == "__main__":
    main()
