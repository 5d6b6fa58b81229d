"""View 3, the prompt inspector (Transformer Debugger's node table for any supported model): the SAE latents per
token, the next-token distribution, a logit lens, an attention pattern, latent attribution for a target token and
ablations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from mechscope.apps.explorer import figures, results, state
from mechscope.models.hooked import HookedModel
from mechscope.models.names import block_hook
from mechscope.sae.attribution import LatentAttribution, ablate, attribute_latents
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.splice import splice_sae
from mechscope.tools.logit_lens import LogitLens

DEFAULT_PROMPT = "The capital of France is"
UNIT = re.compile(r"^\s*(\d+)\s*[:.]\s*(\d+)\s*$")


@st.cache_resource(show_spinner="loading the model (once)")
def load_model(name: str) -> HookedModel:
    return HookedModel.from_pretrained(name)


@st.cache_resource(show_spinner=False)
def load_sae(path: str) -> SparseAutoencoder:
    return SparseAutoencoder.load(path)


@dataclass(frozen=True)
class Run:
    """One prompt through the model with the SAE spliced in: ``tokens [1, pos]``, ``logits [pos, d_vocab]``,
    ``latents [pos, d_sae]`` and every layer's ``patterns [n_layers, head, pos, pos]``."""

    tokens: torch.Tensor
    logits: torch.Tensor
    latents: torch.Tensor
    patterns: torch.Tensor


# Each interaction reruns the whole view; these caches keep what the interaction did not change (an ablation
# costs its own forward passes only). Keyed by the model's and SAE's paths, so each holds one model's results.
@st.cache_resource(show_spinner=False, max_entries=16)
def run_prompt(model_name: str, sae_path: str, hook_name: str, prompt: str) -> Run:
    model, sae = load_model(model_name), load_sae(sae_path)
    tokens = model.to_tokens(prompt)
    splice = splice_sae(model, sae, hook_name, include_error=True, cache=True)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=splice)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    patterns = torch.stack([cache[block_hook(i, "attn.hook_pattern")][0] for i in range(model.cfg.n_layers)])
    return Run(tokens, logits[0], splice.cache[f"{hook_name}.hook_sae_acts_post"][0], patterns)


@st.cache_resource(show_spinner=False, max_entries=64)
def lens_at(model_name: str, prompt: str, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, ids)`` ``[n_layers]``: the logit lens's top token after each layer at ``position``."""
    model = load_model(model_name)
    _, logits = LogitLens(model).layer_logits(model.to_tokens(prompt), position=position)  # [layers, 1, d_vocab]
    probs, ids = logits[:, 0].softmax(-1).max(-1)
    return probs, ids


@st.cache_resource(show_spinner=False, max_entries=64)
def attribution(
    model_name: str, sae_path: str, hook_name: str, prompt: str, target: int, position: int
) -> LatentAttribution:
    model, sae = load_model(model_name), load_sae(sae_path)
    return attribute_latents(model, sae, model.to_tokens(prompt), target, position, hook_name)


def parse_units(text: str, what: str) -> list[tuple[int, int]]:
    """``"3:17, 5:2"`` -> ``[(3, 17), (5, 2)]``; raises ValueError naming the bad part."""
    units = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = UNIT.match(part)
        if m is None:
            raise ValueError(f"{what}: {part!r} is not LAYER:INDEX (e.g. 3:17)")
        units.append((int(m[1]), int(m[2])))
    return units


def sources(root: Path, ds: results.DashboardSet) -> tuple[str, str, str]:
    """``(model, sae path, hook name)`` the dashboards were computed with."""
    source: dict[str, Any] = results.meta(ds).get("source", {})
    missing = [k for k in ("model", "sae", "hook_name") if not source.get(k)]
    if missing:
        raise results.MissingResults(
            f"{ds.path}/dashboards.json does not say {missing}; run the dashboards stage again"
        )
    return source["model"], str(results.inside(root, ds.path / source["sae"])), source["hook_name"]


def show(root: Path) -> None:
    st.header("Prompt inspector")
    sets = results.require_dashboards(root)
    model_name, sae_path, hook_name = sources(root, sets[0])
    model = load_model(model_name)
    sae = load_sae(sae_path)
    prompt = state.synced(
        "prompt", st.query_params.get("prompt", DEFAULT_PROMPT), lambda key: st.text_area("prompt", key=key)
    )
    tokens = model.to_tokens(prompt)  # cheap; the forward passes below run once per prompt (run_prompt)
    if tokens.shape[1] > model.cfg.n_ctx:
        st.error(f"the prompt has {tokens.shape[1]} tokens, more than the model's context n_ctx={model.cfg.n_ctx}")
        return
    labels = [f"{i}:{t!r}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    position = st.select_slider(
        "position", options=list(range(len(labels))), value=len(labels) - 1, format_func=lambda i: labels[i]
    )

    run = run_prompt(model_name, sae_path, hook_name, prompt)
    latents = run.latents  # [pos, d_sae]
    top = latents.topk(min(5, latents.shape[-1]), dim=-1)
    chosen = sorted({int(i) for i, v in zip(top.indices.flatten(), top.values.flatten(), strict=True) if v > 0})

    probs = run.logits[position].float().softmax(-1)
    best = probs.topk(10)
    left, right = st.columns(2)
    with left:
        st.markdown("**SAE latents per token** (each token's top 5; activation / the latent's max over the corpus)")
        if chosen:
            scale = torch.from_numpy(results.array(sets[0], "max_activation")[chosen]).clamp_min(1e-6)
            z = (latents[:, chosen] / scale).clamp(0, 1).T.tolist()
            st.plotly_chart(figures.heatmap(z, labels, [f"latent {i}" for i in chosen], ""), key="latent_heatmap")
        else:
            st.caption("no latent is active on this prompt")
    with right:
        st.markdown(f"**Next token after {labels[position]}**")
        st.dataframe(
            {"token": [repr(model.to_string([i])) for i in best.indices.tolist()], "prob": best.values.tolist()},
            hide_index=True,
        )

    left, right = st.columns(2)
    with left:
        lens_probs, lens_ids = lens_at(model_name, prompt, position)
        st.markdown("**Logit lens** (top token after each layer)")
        st.dataframe(
            {
                "layer": list(range(lens_ids.numel())),
                "token": [repr(model.to_string([i])) for i in lens_ids.tolist()],
                "prob": lens_probs.tolist(),
            },
            hide_index=True,
        )
    with right:
        layer = st.number_input("layer", 0, model.cfg.n_layers - 1, 0, key="attn_layer")
        head = st.number_input("head", 0, model.cfg.n_heads - 1, 0, key="attn_head")
        pattern = run.patterns[int(layer), int(head)]
        st.plotly_chart(figures.heatmap(pattern.tolist(), labels, labels, f"attention L{layer}H{head}"), key="pattern")

    st.subheader("Attribution to a target token")
    target = int(
        st.selectbox(
            "target token (the likeliest next tokens)",
            best.indices.tolist(),
            format_func=lambda i: repr(model.to_string([i])),
            key="target",
        )
    )
    typed = st.text_input("or type a target token", key="target_text")
    if typed:
        typed_ids = model.to_tokens(typed, prepend_bos=False)[0]
        if typed_ids.numel() != 1:
            st.error(f"{typed!r} is {typed_ids.numel()} tokens; give one token")
            return
        target = int(typed_ids[0])
    att = attribution(model_name, sae_path, hook_name, prompt, target, position)
    st.dataframe(
        {
            "latent": att.latents.tolist(),
            "activation": att.activations.tolist(),
            "write |a|·‖W_dec‖": att.write_norms.tolist(),
            "direct effect": att.direct_effects.tolist(),
            "activation × gradient": att.grad_x_act.tolist(),
        },
        hide_index=True,
        key="attribution",
    )

    st.subheader("Ablation")
    active = att.latents.tolist()
    from_url = [int(t) for t in st.query_params.get("ablate", "").split(",") if t.strip().isdigit()]
    picked = st.multiselect(
        "latents to ablate", active, default=[i for i in from_url if i in active], key="ablate_latents"
    )
    st.query_params["ablate"] = ",".join(map(str, picked))
    neurons_text = st.text_input("MLP neurons (LAYER:INDEX, ...)", key="ablate_neurons")
    heads_text = st.text_input("attention heads (LAYER:HEAD, ...)", key="ablate_heads")
    try:
        neurons, heads = parse_units(neurons_text, "neurons"), parse_units(heads_text, "heads")
        result = ablate(
            model, tokens, target, position, sae=sae, latents=picked, neurons=neurons, heads=heads, hook_name=hook_name
        )
    except ValueError as e:
        st.error(str(e))
        return
    if picked or neurons or heads:
        parts = [
            f"ablated {what}: {', '.join(text)}"
            for what, text in (
                ("latents", [str(i) for i in picked]),
                ("neurons", [f"{layer}:{i}" for layer, i in neurons]),
                ("heads", [f"{layer}:{h}" for layer, h in heads]),
            )
            if text
        ]
        st.caption(" · ".join(parts))
        cols = st.columns(2)
        cols[0].metric(
            "target logit", f"{result.ablated_logit:.3f}", f"{result.ablated_logit - result.clean_logit:+.3f}"
        )
        cols[1].metric(
            "target probability", f"{result.ablated_prob:.4f}", f"{result.ablated_prob - result.clean_prob:+.4f}"
        )
        ids, ps = result.ablated_top
        st.dataframe(
            {"token after ablation": [repr(model.to_string([i])) for i in ids.tolist()], "prob": ps.tolist()},
            hide_index=True,
        )
