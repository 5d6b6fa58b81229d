"""The hook-name grammar (mechscope.models.names) and the model structure it describes, against plain references."""

from __future__ import annotations

import random
import re

import pytest
import torch

from mechscope import get_act_name
from mechscope.models.names import (
    BLOCK_POINTS,
    HookName,
    block_hook,
    hook_layer,
    hook_names,
    is_attention_map,
    is_per_head,
    module_hook,
    parse_hook,
    sae_hook,
    stop_layer_for,
)
from mechscope.models.points import token_vectors
from tests.conftest import build_pair


# ---- the grammar ----------------------------------------------------------------------------------------------
def test_round_trips_of_every_form():
    cases = {
        "hook_embed": HookName("hook_embed"),
        "hook_pos_embed": HookName("hook_pos_embed"),
        "blocks.0.hook_resid_pre": HookName("hook_resid_pre", layer=0),
        "blocks.12.attn.hook_z": HookName("attn.hook_z", layer=12),
        "blocks.3.ln2.hook_scale": HookName("ln2.hook_scale", layer=3),
        "ln_final.hook_normalized": HookName("ln_final.hook_normalized"),
        "hook_logits": HookName("hook_logits"),
        "layers.0.self_attn.hook_result_post": HookName("hook_result_post", module="layers.0.self_attn"),
        "h.1.mlp.c_fc.hook_result_pre": HookName("hook_result_pre", module="h.1.mlp.c_fc"),
        "blocks.2.hook_resid_post.hook_sae_acts_post": HookName("hook_resid_post", 2, sae="hook_sae_acts_post"),
        "layers.6.hook_result_post.hook_sae_error": HookName(
            "hook_result_post", module="layers.6", sae="hook_sae_error"
        ),
    }
    for name, parsed in cases.items():
        assert parse_hook(name) == parsed, name
        assert str(parsed) == name
    assert block_hook(12, "attn.hook_z") == "blocks.12.attn.hook_z"
    assert module_hook("layers.0.self_attn") == "layers.0.self_attn.hook_result_post"
    assert module_hook("layers.0.self_attn", "pre") == "layers.0.self_attn.hook_result_pre"
    assert sae_hook("blocks.2.hook_resid_post", "hook_sae_acts_post") == "blocks.2.hook_resid_post.hook_sae_acts_post"
    for layer in (0, 7, 31):
        for point in BLOCK_POINTS:
            assert parse_hook(block_hook(layer, point)) == HookName(point, layer=layer)


def test_hook_names_lists_every_point_in_forward_order():
    names = hook_names(2)
    assert names[:2] == ["hook_embed", "hook_pos_embed"]
    assert names[-5:] == [
        "ln_final.hook_scale",
        "ln_final.hook_normalized",
        "unembed.hook_in",
        "unembed.hook_out",
        "hook_logits",
    ]
    assert names[2 : 2 + len(BLOCK_POINTS)] == [f"blocks.0.{p}" for p in BLOCK_POINTS]
    assert len(names) == len(set(names)) == 7 + 2 * len(BLOCK_POINTS)


@pytest.mark.parametrize(
    ("family", "blocks_module"), [("gpt2", "h"), ("gpt_neox", "layers"), ("llama", "layers"), ("phi3", "layers")]
)
def test_every_name_of_a_tiny_model_parses_and_rebuilds(family, blocks_module):
    model = build_pair(family)[0]
    canonical = model.hook_names()
    everything = model.hook_names(include_module_points=True)
    assert set(canonical) <= set(hook_names(model.cfg.n_layers))
    order = hook_names(model.cfg.n_layers)
    assert canonical == sorted(canonical, key=order.index)  # the model's names keep the grammar's order
    for name in everything:
        parsed = parse_hook(name)
        assert str(parsed) == name
        if name in canonical:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            assert parsed.layer == (int(m.group(1)) if m else None)
            assert parsed.module is None
        else:
            assert parsed.module is not None and model.points.backbone.get_submodule(parsed.module) is not None
        m = re.match(rf"(?:blocks|{blocks_module})\.(\d+)(?:\.|$)", parsed.module or name)
        assert hook_layer(name, blocks_module) == (int(m.group(1)) if m else None), name
    assert model.points.names == canonical


def _reference_stop(names, n_layers, blocks_module):
    """The stop_at_layer reaching every name, written plainly: a block's points need that block."""
    needed = -1
    for name in names:
        m = re.match(rf"(?:blocks|{re.escape(blocks_module)})\.(\d+)\.", name)
        if m:
            needed = max(needed, int(m.group(1)))
        elif name not in ("hook_embed", "hook_pos_embed"):
            return None
    return min(needed + 1, n_layers)


def test_stop_layer_against_a_plain_reference():
    assert stop_layer_for(["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"], 4) == 3
    assert stop_layer_for(["hook_embed"], 4) == 0
    assert stop_layer_for(["blocks.1.hook_resid_pre", "ln_final.hook_normalized"], 4) is None
    assert stop_layer_for(["layers.2.mlp.hook_result_post"], 4) is None  # without the blocks' module path
    assert stop_layer_for(["layers.2.mlp.hook_result_post"], 4, "layers") == 3
    assert stop_layer_for(["norm.hook_result_post"], 4, "layers") is None
    rng = random.Random(0)
    for family, blocks_module in (("llama", "layers"), ("gpt2", "h")):
        model = build_pair(family)[0]
        every = model.hook_names(include_module_points=True)
        for _ in range(300):
            names = rng.sample(every, rng.randint(1, 4))
            expected = _reference_stop(names, model.cfg.n_layers, blocks_module)
            assert model.stop_layer_for(names) == expected, names
            assert stop_layer_for(names, model.cfg.n_layers, blocks_module) == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_layer_is_the_smallest_that_reaches_the_hooks(family, tokens):
    model = build_pair(family)[0]
    every = model.hook_names(include_module_points=True)
    with torch.no_grad():
        fired = sorted(model.run_with_cache(tokens, names_filter=every)[1])  # dropout modules never run, e.g.
    rng = random.Random(1)
    for _ in range(12):
        names = rng.sample(fired, 2)
        stop = model.stop_layer_for(names)
        if stop is None:
            continue
        _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop)
        assert set(cache) == set(names)
        if stop > 0:
            _, fewer = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop - 1)
            assert set(fewer) < set(names)


def test_per_head_and_attention_maps():
    per_head = {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z"}
    per_head |= {"attn.hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"}
    for point in BLOCK_POINTS:
        assert is_per_head(block_hook(3, point)) == (point in per_head)
        assert is_attention_map(block_hook(3, point)) == (point in ("attn.hook_attn_scores", "attn.hook_pattern"))
    for name in ("hook_embed", "layers.0.self_attn.hook_result_post", "blocks.0.attn.hook_z.hook_sae_input"):
        assert not is_per_head(name) and not is_attention_map(name)
    z = torch.randn(2, 5, 4, 16)
    assert token_vectors(z, "blocks.0.attn.hook_z").shape == (2, 5, 64)
    assert torch.equal(token_vectors(z, "blocks.0.attn.hook_z").view(z.shape), z)
    assert token_vectors(z, "blocks.0.hook_resid_post") is z


def test_shorthand_expands_through_the_grammar():
    for point in BLOCK_POINTS:
        part, _, hook = point.rpartition(".")
        short = hook.removeprefix("hook_")
        if part.startswith("ln"):
            assert get_act_name(short, 1, part) == block_hook(1, point)
        else:
            assert get_act_name(short, 1) == block_hook(1, point)
    assert get_act_name("embed") == "hook_embed" and get_act_name("logits") == "hook_logits"
    assert get_act_name("normalized") == "ln_final.hook_normalized"
    assert get_act_name("blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"


def test_bad_names_raise_errors_naming_the_fix():
    with pytest.raises(ValueError, match="did you mean hook_resid_post"):
        parse_hook("blocks.0.hook_resid_pots")
    for bad in ("blocks.x.hook_resid_post", "blocks.03.hook_resid_post", "blocks.hook_resid_post"):
        with pytest.raises(ValueError, match=r"followed by the layer .* e\.g\. 'blocks\.0\.hook_resid_post'"):
            parse_hook(bad)
    with pytest.raises(ValueError, match=r"shorthand: get_act_name\('resid_post', layer\)"):
        parse_hook("resid_post")
    with pytest.raises(ValueError, match=r"not a hook name; hook names are hook_embed, .*model\.hook_names\(\)"):
        parse_hook("layers.0.self_attn")
    with pytest.raises(ValueError, match="an SAE point follows the hook name the SAE reads, once"):
        parse_hook("blocks.0.hook_resid_post.hook_sae_input.hook_sae_input")
    with pytest.raises(TypeError, match="a hook name is a string"):
        parse_hook(3)
    with pytest.raises(ValueError, match="not a point of a block; the points of a block are hook_resid_pre"):
        block_hook(0, "hook_resid")
    with pytest.raises(TypeError, match="a block's layer is an int"):
        block_hook("0", "hook_resid_pre")
    with pytest.raises(ValueError, match=r"'pre' .* or 'post'"):
        module_hook("layers.0", "mid")
    with pytest.raises(ValueError, match="needs the module's path"):
        module_hook("")
    with pytest.raises(ValueError, match="those are hook_sae_input"):
        sae_hook("blocks.0.hook_resid_post", "hook_sae_latents")
    with pytest.raises(ValueError, match="not a point of a block"):
        get_act_name("scale", 0, "ln3")


# ---- what the model says about its names ----------------------------------------------------------------------
def test_hook_shape_is_every_activations_shape(pair, tokens):
    model, _ = pair
    names = model.hook_names(include_module_points=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    checked = 0
    for name in names:
        if name not in cache:  # a module that does not run (a ModuleList, dropout under SDPA)
            assert parse_hook(name).module is not None, name
            continue
        act = cache[name]
        if is_attention_map(name):
            with pytest.raises(ValueError, match="attention map"):
                model.hook_shape(name)
            continue
        try:
            shape = model.hook_shape(name)
        except ValueError as e:
            assert parse_hook(name).module is not None and "without running the model" in str(e), name
            continue
        assert act.shape == (*tokens.shape, *shape), name
        assert model.hook_width(name) == token_vectors(act, name).shape[-1], name
        checked += 1
    assert checked >= len(model.hook_names()) - 2 * model.cfg.n_layers  # every canonical name but the maps
    with pytest.raises(ValueError, match="out of range"):
        model.hook_shape(f"blocks.{model.cfg.n_layers}.hook_resid_post")
    with pytest.raises(KeyError, match="Closest valid names"):
        model.hook_shape("blocks.0.hook_resid_pots")


def test_blocks_ln_final_unembed_and_parts(pair, tokens):
    model, plain = pair
    n = model.cfg.n_layers
    assert len(model.blocks) == n
    final = model.module_hook(model.ln_final)
    names = [final, "hook_logits"]
    names += [name for i in range(n) for name in (block_hook(i, "hook_resid_post"), model.module_hook(model.blocks[i]))]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        normed = model.ln_final(cache[block_hook(n - 1, "hook_resid_post")])
        unembedded = model.unembed(normed)
    torch.testing.assert_close(normed, cache[final])
    for i in range(n):  # the block modules are the blocks the hooks are on
        torch.testing.assert_close(cache[model.module_hook(model.blocks[i])], cache[block_hook(i, "hook_resid_post")])
    torch.testing.assert_close(unembedded, normed @ model.W_U + model.b_U)
    cap = model.cfg.output_logits_soft_cap
    assert cap == (getattr(plain.config, "final_logit_softcapping", None) or -1.0)
    expected = torch.tanh(unembedded / cap) * cap if cap > 0 else unembedded
    torch.testing.assert_close(expected, logits, atol=1e-5, rtol=1e-5)
    parts = ["attn", "o_proj", "ln1", "ln2", "attn_out", "mlp", "mlp_out", "mlp_in", "mlp_down"]
    for part in parts + (["mlp_up"] if model.adapter.mlp_kind == "gated" else []):
        module = model.block_part(n - 1, part)
        assert model.module_hook(module, "pre") in model.hook_names(include_module_points=True)
    with pytest.raises(ValueError, match="not a part of a block; the parts are attn"):
        model.block_part(0, "ffn")
    with pytest.raises(ValueError, match="not a submodule of the model's backbone"):
        model.module_hook(torch.nn.Linear(2, 2))
