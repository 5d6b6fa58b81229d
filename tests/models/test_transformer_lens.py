"""Hooked models against TransformerLens's own ``HookedTransformer`` on the same random weights, every family.

TransformerLens 3.x runs in the reference venv (see ``transformer_lens_reference.py``), once for this whole module:
the ``reference`` fixture collects every run (hook values, padded batches, edits, ``stop_at_layer``, shorthand) and
the tests compare mechscope's values with TransformerLens's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mechscope import HookedModel, get_act_name
from mechscope.models.names import OPT_IN_POINTS, block_hook, parse_hook
from tests.conftest import FAMILIES, build_pair, torch_hook_count
from tests.models.edits import edit_fn
from tests.models.transformer_lens_reference import reference_values

ATOL = 2e-5
#: TransformerLens hook points mechscope does not serve: Qwen 3's per-head q/k-norms (TransformerLens hooks them on
#: a ``[batch * pos * head, d_head]`` reshape)
NOT_SERVED = tuple(f"attn.{norm}.hook_{point}" for norm in ("q_norm", "k_norm") for point in ("scale", "normalized"))
LENGTHS = (9, 6, 3)  # the rows of the padded batches
ALL_FLAGS = {"use_split_qkv_input": True, "use_hook_mlp_in": True}
#: get_act_name calls compared with TransformerLens's: every shorthand a tutorial uses, its aliases, compact forms
ACT_NAMES: list[tuple] = [
    ("embed",),
    ("pos_embed",),
    ("resid_pre", 1),
    ("resid_mid", 0),
    ("resid_post", 11),
    ("attn_out", 2),
    ("mlp_out", 2),
    ("q", 0),
    ("k", 3),
    ("v", 1),
    ("z", 0, "a"),
    ("rot_q", 1),
    ("rot_k", 0),
    ("result", 3),
    ("attn_scores", 1),
    ("attn_logits", 1),
    ("pattern", 2),
    ("attn", 0),
    ("key", 1),
    ("query", 1),
    ("value", 1),
    ("pre", 2),
    ("pre_linear", 0),
    ("post", 0),
    ("mlp_pre", 1),
    ("mlp_post", 1),
    ("attn_in", 0),
    ("q_input", 2),
    ("k_input", 1),
    ("v_input", 0),
    ("mlp_in", 1),
    ("scale",),
    ("normalized",),
    ("scale", 3, "ln1"),
    ("normalized", 27, "ln2"),
    ("k6",),
    ("pre5",),
    ("z0",),
    ("scale4ln1",),
    ("normalized2ln2",),
    ("blocks.0.hook_resid_pre",),
    ("hook_embed",),
]
#: where TransformerLens builds a name no model has, mechscope builds the one meant (and documents it)
ACT_NAMES_DIFFERENT = {("resid_pre5",): "blocks.5.hook_resid_pre", ("scale", 2): "blocks.2.ln1.hook_scale"}


def gqa(model: HookedModel) -> bool:
    return model.cfg.n_key_value_heads != model.cfg.n_heads


def edits_of(model: HookedModel) -> dict[str, tuple[dict, dict]]:
    """Edits that change the logits, by label: ``(edit spec, the model options it needs)``."""
    c = model.cfg
    edits = {
        "q": ({"hook": "blocks.0.attn.hook_q", "head": 1}, {}),
        "k": ({"hook": "blocks.1.attn.hook_k", "head": 0}, {}),
        "v": ({"hook": "blocks.0.attn.hook_v", "head": c.n_key_value_heads - 1}, {}),
        "q_input": ({"hook": "blocks.0.hook_q_input", "head": 1}, {"use_split_qkv_input": True}),
        "k_input": ({"hook": "blocks.1.hook_k_input", "head": 0}, {"use_split_qkv_input": True}),
        "v_input": ({"hook": "blocks.0.hook_v_input", "head": 1}, {"use_split_qkv_input": True}),
        "mlp_in": ({"hook": "blocks.0.hook_mlp_in", "head": None}, {"use_hook_mlp_in": True}),
        "unembed_in": ({"hook": "unembed.hook_in", "head": None}, {}),
        "unembed_out": ({"hook": "unembed.hook_out", "head": None}, {}),
        "resid_pre": ({"hook": "blocks.1.hook_resid_pre", "head": None}, {}),
    }
    if c.positional_embedding_type == "rotary":
        edits["rot_q"] = ({"hook": "blocks.0.attn.hook_rot_q", "head": 2}, {})
        edits["rot_k"] = ({"hook": "blocks.1.attn.hook_rot_k", "head": 1}, {})
    if not gqa(model):
        edits["attn_in"] = ({"hook": "blocks.0.hook_attn_in", "head": 2}, {"use_attn_in": True})
        # with split inputs on, q, k and v come from them: TransformerLens ignores hook_attn_in edits then
        edits["attn_in_and_split"] = (
            {"hook": "blocks.0.hook_attn_in", "head": 2},
            {"use_attn_in": True, "use_split_qkv_input": True},
        )
    if c.family == "gemma2":
        edits["ln1_post"] = ({"hook": "blocks.0.ln1_post.hook_normalized", "head": None}, {})
    return {k: ({**e, "scale": 0.5, "shift": 0.25}, flags) for k, (e, flags) in edits.items()}


def stops_of(model: HookedModel) -> tuple[int, ...]:
    return (0, 1, -1, model.cfg.n_layers)


def opt_in_names(model: HookedModel, flags: dict) -> list[str]:
    return [
        block_hook(layer, p)
        for flag, points in OPT_IN_POINTS.items()
        if flags.get(flag)
        for p in points
        for layer in range(model.cfg.n_layers)
    ]


def padded(tokens: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``i`` of ``tokens`` cut to ``LENGTHS[i]`` and padded (with token 0) on ``side``, and their mask."""
    out, mask = torch.zeros_like(tokens), torch.zeros_like(tokens)
    width = tokens.shape[1]
    for i, n in enumerate(LENGTHS):
        real = slice(width - n, width) if side == "left" else slice(0, n)
        out[i, real], mask[i, real] = tokens[i, :n], 1
    return out, mask


def real_positions(side: str, width: int, n: int) -> slice:
    return slice(width - n, width) if side == "left" else slice(0, n)


@dataclass
class Reference:
    models: dict[str, HookedModel]
    inputs: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    fired: dict[str, list[str]]
    act_names: list[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    pairs = {f: build_pair(f) for f in FAMILIES}
    tokens = torch.randint(0, 50256, (3, max(LENGTHS)), generator=torch.Generator().manual_seed(0))
    inputs = {"t": tokens}
    for side in ("left", "right"):
        inputs[side], inputs[f"{side}_mask"] = padded(tokens, side)
    runs = []
    for f, (model, _) in pairs.items():
        flags = {**ALL_FLAGS, "use_attn_in": not gqa(model)}
        runs += [
            {"id": f"{f}/plain", "model": f, "tokens": "t", "names": "*", "flags": {"use_attn_result": True}},
            {"id": f"{f}/opt_in", "model": f, "tokens": "t", "names": opt_in_names(model, flags), "flags": flags},
        ]
        runs += [
            {"id": f"{f}/{side}", "model": f, "tokens": side, "mask": f"{side}_mask", "names": "*"}
            for side in ("left", "right")
        ]
        runs += [
            {"id": f"{f}/edit/{label}", "model": f, "tokens": "t", "edits": [edit], "flags": needs}
            for label, (edit, needs) in edits_of(model).items()
        ]
        runs += [{"id": f"{f}/stop/{s}", "model": f, "tokens": "t", "stop_at_layer": s} for s in stops_of(model)]
    act_names = [*ACT_NAMES, *ACT_NAMES_DIFFERENT]
    plains = {f: plain for f, (_, plain) in pairs.items()}
    values, metadata = reference_values(tmp_path_factory, plains, inputs, runs, act_names)
    models = {f: model for f, (model, _) in pairs.items()}
    return Reference(models, inputs, values, metadata["fired"], metadata["act_names"])


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert ours.shape == theirs.shape, (what, tuple(ours.shape), tuple(theirs.shape))
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def options():
    """Sets model options for one test and turns them off afterwards (the models are shared by the module)."""
    touched: list[HookedModel] = []

    def set_options(model: HookedModel, flags: dict) -> HookedModel:
        for flag in OPT_IN_POINTS:
            getattr(model, f"set_{flag}")(bool(flags.get(flag)))
        touched.append(model)
        return model

    yield set_options
    for model in touched:
        for flag in OPT_IN_POINTS:
            getattr(model, f"set_{flag}")(False)


# ---- item 2 and 3: every hook TransformerLens fires, with its value --------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_every_hook_transformer_lens_fires_has_its_value(reference, family):
    model, ref = reference.models[family], reference.values
    logits, cache = model.run_with_cache(reference.inputs["t"], names_filter=lambda n: True)
    close(logits, ref[f"{family}/plain/out"], "logits")
    theirs = reference.fired[f"{family}/plain"]
    expected = [n for n in theirs if not n.endswith(NOT_SERVED)]
    assert len(expected) == len(theirs) - (4 * model.cfg.n_layers if family == "qwen3" else 0)
    missing = [n for n in expected if n not in cache]
    assert not missing, f"TransformerLens hook points mechscope does not serve: {missing}"
    for name in expected:
        close(cache[name], ref[f"{family}/plain/{name}"], name)
    # the points TransformerLens has only on rotary models, and the unembedding's
    rotary = model.cfg.positional_embedding_type == "rotary"
    assert ("blocks.0.attn.hook_rot_q" in expected) == rotary == ("blocks.0.attn.hook_rot_q" in model.hook_names())
    assert {"unembed.hook_in", "unembed.hook_out"} <= set(expected)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_opt_in_points_equal_transformer_lens_and_cost_nothing_until_hooked(reference, family, options):
    model = reference.models[family]
    names = opt_in_names(model, {**ALL_FLAGS, "use_attn_in": True})
    assert not set(names) & set(model.hook_names())  # off by default, as in TransformerLens
    for name in names:
        flag = next(f for f, points in OPT_IN_POINTS.items() if parse_hook(name).point in points)
        with pytest.raises(KeyError, match=rf"exists only with the option {flag} .*set_{flag}\(True\)"):
            model.run_with_cache("hi", names_filter=name)
    if gqa(model):
        with pytest.raises(ValueError, match=r"grouped-query attention .* use use_split_qkv_input"):
            model.set_use_attn_in(True)
    flags = {**ALL_FLAGS, "use_attn_in": not gqa(model)}
    options(model, flags)
    names = opt_in_names(model, flags)
    assert set(names) <= set(model.hook_names())
    assert torch_hook_count(model.model) == 0  # an option alone installs nothing
    _, cache = model.run_with_cache(reference.inputs["t"])  # the default cache keeps them, as TransformerLens's
    for name in names:
        close(cache[name], reference.values[f"{family}/opt_in/{name}"], name)
        assert cache[name].shape[2:] == model.hook_shape(name)


# ---- item 2 and 3: edits flow downstream as in TransformerLens -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_edits_reach_the_logits_as_in_transformer_lens(reference, family, options):
    model, tokens = reference.models[family], reference.inputs["t"]
    unedited = model(tokens)
    for label, (edit, needs) in edits_of(model).items():
        options(model, needs)
        logits = model.run_with_hooks(tokens, fwd_hooks=[(edit["hook"], edit_fn(edit))])
        close(logits, reference.values[f"{family}/edit/{label}/out"], f"logits after the {label} edit", atol=5e-5)
        changed = (logits - unedited).abs().max().item()
        assert (changed == 0.0) == (label == "attn_in_and_split"), (label, changed)


@torch.no_grad()
def test_an_in_place_edit_of_mlp_in_reaches_the_mlp_only(reference, options):
    """``hook_mlp_in`` is a copy of the MLP's input: editing it in place leaves the residual stream (TransformerLens
    clones it too)."""
    model, tokens = options(reference.models["llama"], {"use_hook_mlp_in": True}), reference.inputs["t"]

    def in_place(x, hook):
        x.mul_(0.5).add_(0.25)

    def keep(store):
        return lambda x, hook: store.append(x.clone())

    mid, post = [], []
    hooks = [("blocks.0.hook_mlp_in", in_place), ("blocks.0.hook_resid_mid", keep(mid))]
    logits = model.run_with_hooks(tokens, fwd_hooks=[*hooks, ("blocks.0.hook_mlp_out", keep(post))])
    close(logits, reference.values["llama/edit/mlp_in/out"], "logits after the in-place edit")
    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_mid")
    assert torch.equal(mid[0], clean["blocks.0.hook_resid_mid"])


# ---- item 1: padded batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_rows_give_the_logits_of_each_row_alone(reference, family, side):
    model, inputs = reference.models[family], reference.inputs
    tokens, mask = inputs[side], inputs[f"{side}_mask"]
    width = tokens.shape[1]
    by_forward = model(tokens, attention_mask=mask)
    by_cache, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter="blocks.1.hook_resid_post")
    seen = []
    by_hooks = model.run_with_hooks(
        tokens, attention_mask=mask, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: seen.append(z.clone()))]
    )
    theirs = reference.values[f"{family}/{side}/out"]
    for i, n in enumerate(LENGTHS):
        real = real_positions(side, width, n)
        alone, alone_cache = model.run_with_cache(inputs["t"][i : i + 1, :n], names_filter=lambda m: True)
        for what, ours in (("forward", by_forward), ("run_with_cache", by_cache), ("run_with_hooks", by_hooks)):
            close(ours[i, real], alone[0], f"{what}, row {i} of a {side}-padded batch")
        close(by_forward[i, real], theirs[i, real], f"TransformerLens, row {i} of a {side}-padded batch")
        close(cache["blocks.1.hook_resid_post"][i, real], alone_cache["blocks.1.hook_resid_post"][0], "resid_post")
        close(seen[0][i, real], alone_cache["blocks.0.attn.hook_z"][0], "hook_z")


def test_text_batches_pad_on_the_side_asked_for(gpt2):
    texts = ["a much longer prompt than the other", "short"]
    with torch.no_grad():
        left = gpt2(texts, padding_side="left")
        right = gpt2(texts, padding_side="right")
        alone = gpt2(texts[1])
    n = alone.shape[1]
    close(left[1, -n:], alone[0], "left-padded text")
    close(right[1, :n], alone[0], "right-padded text")


# ---- item 5: stop_at_layer and get_act_name --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_stop_at_layer_returns_transformer_lens_residual(reference, family):
    model, tokens = reference.models[family], reference.inputs["t"]
    for stop in stops_of(model):
        theirs = reference.values[f"{family}/stop/{stop}/out"]
        close(model(tokens, stop_at_layer=stop), theirs, f"stop_at_layer={stop}")
        residual, _ = model.run_with_cache(tokens, stop_at_layer=stop, names_filter="hook_embed")
        close(residual, theirs, f"run_with_cache(stop_at_layer={stop})")


def test_get_act_name_equals_transformer_lens(reference):
    ours = [get_act_name(*args) for args in ACT_NAMES]
    assert ours == reference.act_names[: len(ACT_NAMES)]
    theirs_different = reference.act_names[len(ACT_NAMES) :]
    # TransformerLens builds names no model has here ...
    assert theirs_different == ["hook_resid_pre5", "blocks.2.hook_scale"]
    # ... and mechscope the ones meant
    assert [get_act_name(*args) for args in ACT_NAMES_DIFFERENT] == list(ACT_NAMES_DIFFERENT.values())
