"""mechscope.compat.tdb: Transformer Debugger's models API on mechscope, checked against independent computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mechscope import HookedAutoConfig, HookedAutoModel, HookedModel
from mechscope.compat.tdb import (
    AtLayers,
    Autoencoder,
    AutoencoderHooks,
    Dimension,
    StandardModelContext,
    Transformer,
    TransformerHooks,
    WeightLocationType,
    get_default_device,
    nucleus_sample,
)

from .tdb_utils import openai_state_dict, reference_transformer


@pytest.fixture(scope="session")
def tdb_folder(tmp_path_factory) -> Path:
    """A 4-layer random Llama (d_mlp 384, byte vocabulary) saved with save_pretrained + its tokenizer."""
    torch.manual_seed(0)
    model = HookedAutoModel(HookedAutoConfig("llama", num_hidden_layers=4, intermediate_size=384, vocab_size=257))
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tdb_model")
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tdb_xf(tdb_folder) -> Transformer:
    return Transformer.load(str(tdb_folder), device="cpu")


def _store(store: dict | list, key: str | None = None):
    """A TDB hook that keeps a copy of what it sees (under ``key``, else under its layer) and passes it on."""

    def keep(xx, *args, layer=None, **kwargs):
        if isinstance(store, list):
            store.append(layer)
        else:
            store[key if key is not None else layer] = xx.detach().clone()
        return xx

    return keep


def test_readme_transformer_example(tdb_folder):
    """The TDB models README's first example, with a local folder in place of the download."""
    device = get_default_device()
    xf = Transformer.load(str(tdb_folder), dtype=torch.float32, device=device)

    random_tokens = torch.randint(0, xf.n_vocab, (4, 12)).to(xf.device)
    logits, kv_caches = xf(random_tokens)
    assert logits.shape == (4, 12, xf.n_vocab)
    assert kv_caches[0][0].shape[2] == 12  # layer 0's cached keys cover all 12 positions

    out = xf.sample("Hello, transformer!", num_tokens=10, top_p=0.5, temperature=1.0)
    assert set(out) == {"tokens", "strings"} and len(out["tokens"][0]) == 10
    assert out["strings"][0] == "".join(xf.enc.decode([t]) for t in out["tokens"][0])

    def make_ablation_hook(at_layer, neuron):
        def ablate_neuron(xx, layer, **kwargs):
            if layer == at_layer:
                xx[..., neuron] = 0
            return xx

        return ablate_neuron

    hooks = TransformerHooks()
    hooks.mlp.post_act.append_fwd(make_ablation_hook(3, 300))
    out = xf.sample("Hello, transformer!", hooks=hooks, num_tokens=10, top_p=0.5, temperature=1.0)
    assert len(out["tokens"][0]) == 10

    # the ablation equals zeroing neuron 300 of layer 3 by hand, on the HF model's down_proj input
    ablated, _ = xf(random_tokens, hooks=hooks)
    down = xf.model.model.model.layers[3].mlp.down_proj

    def zero_300(module, args):
        x = args[0].clone()
        x[..., 300] = 0
        return (x,)

    handle = down.register_forward_pre_hook(zero_300)
    try:
        by_hand = xf.model.model(random_tokens).logits
    finally:
        handle.remove()
    plain = xf.model.model(random_tokens).logits
    assert torch.equal(ablated, by_hand)
    assert not torch.allclose(ablated, plain)
    assert torch.equal(logits, plain)


def test_readme_autoencoder_example(tdb_folder, tmp_path):
    """The README's second example: store delta_mlp with hooks, encode it with an OpenAI-format autoencoder."""
    xf = Transformer.load(str(tdb_folder), dtype=torch.float32, device="cpu")
    file = tmp_path / "0.pt"
    torch.save(openai_state_dict(xf.cfg.d_model, 96, seed=1), file)
    layer_index = 0
    with open(file, "rb") as f:
        state_dict = torch.load(f, weights_only=True)
        autoencoder = Autoencoder.from_state_dict(state_dict, strict=False)

    activation_cache = {}

    def store_forward(xx, layer, **kwargs):
        activation_cache[layer] = xx.detach().clone()
        return xx

    hooks = TransformerHooks()
    hooks.resid.torso.delta_mlp.append_fwd(store_forward)
    tokens = xf.enc.encode("What is essential is invisible to the")
    assert xf.enc.decode_batch([[t] for t in tokens]) == list("What is essential is invisible to the")
    with torch.no_grad():
        xf(torch.tensor([tokens]), hooks=hooks)
    input_tensor = activation_cache[layer_index][0]  # (n_tokens, d_model)
    with torch.no_grad():
        latent_activations = autoencoder.encode(input_tensor)

    _, cache = xf.model.run_with_cache(torch.tensor([tokens]), names_filter="blocks.0.hook_mlp_out")
    torch.testing.assert_close(input_tensor, cache["blocks.0.hook_mlp_out"][0], rtol=0, atol=0)
    expected = torch.relu(
        (input_tensor - state_dict["pre_bias"]) @ state_dict["encoder.weight"].T + state_dict["latent_bias"]
    )
    torch.testing.assert_close(latent_activations, expected)
    assert sorted(activation_cache) == list(range(xf.cfg.n_layers))


def test_kv_cache_continuation_equals_whole_sequence(tdb_xf):
    tokens = torch.randint(0, 257, (3, 11))
    whole, _ = tdb_xf(tokens)
    first, state = tdb_xf(tokens[:, :5])
    second, state = tdb_xf(tokens[:, 5:9], state)
    third, _ = tdb_xf(tokens[:, 9:], state)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), whole, rtol=1e-5, atol=1e-5)
    keys, values = state[0]
    assert keys.shape[2] == 11 and values.shape[2] == 11


def test_left_padding_matches_unpadded_rows(tdb_xf):
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    out = tdb_xf.sample(prompts, num_tokens=4, temperature=0)
    for prompt, sampled in zip(prompts, out["tokens"], strict=True):
        alone = tdb_xf.sample(prompt, num_tokens=4, temperature=0)["tokens"][0]
        assert sampled == alone
        # greedy by hand: argmax of the full forward pass, one token at a time
        seq = list(prompt)
        for _ in range(4):
            seq.append(int(tdb_xf.model.model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert sampled == seq[len(prompt) :]


def test_sample_inputs_and_strings(tdb_xf):
    by_string = tdb_xf.sample(["ab", "xyz"], num_tokens=3, temperature=0)
    by_tokens = tdb_xf.sample([tdb_xf.enc.encode("ab"), tdb_xf.enc.encode("xyz")], num_tokens=3, temperature=0)
    assert by_string == by_tokens
    assert [tdb_xf.enc.decode(t) for t in by_string["tokens"]] == by_string["strings"]


def test_nucleus_sample_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    torch.manual_seed(0)
    assert set(nucleus_sample(logits, 0.6).tolist()) == {0}
    assert set(nucleus_sample(logits, 0.3).tolist()) == {0}  # the top token is always kept
    draws = nucleus_sample(logits, 0.85)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05


def test_at_layers_and_append_all(tdb_xf):
    seen = []
    hooks = TransformerHooks()
    hooks.mlp.pre_act.append_fwd(AtLayers([1, 2]).append(_store(seen)))
    tdb_xf(torch.tensor([[1, 2, 3]]), hooks=hooks)
    assert seen == [1, 2]
    layers = []
    everywhere = TransformerHooks()
    everywhere.mlp.append_all(_store(layers))  # as in TDB: the fwd, bwd and fwd2 stages of pre_act and post_act
    with torch.no_grad():
        tdb_xf(torch.tensor([[1, 2, 3]]), hooks=everywhere)
    assert layers == [layer for layer in range(4) for _ in range(4)]  # fwd + fwd2, twice; bwd needs a backward


def test_autoencoder_hooks_replace_and_keep_error(tdb_xf):
    ae = Autoencoder.from_state_dict(openai_state_dict(tdb_xf.cfg.d_model, 80, seed=2))
    tokens = torch.tensor([[3, 14, 15, 92, 65]])
    plain, _ = tdb_xf(tokens)

    kept = TransformerHooks()
    kept.resid.torso.delta_mlp.append_fwd(AtLayers(1).append(AutoencoderHooks(ae.encode, ae.decode, add_error=True)))
    with_error, _ = tdb_xf(tokens, hooks=kept)
    torch.testing.assert_close(with_error, plain, rtol=1e-5, atol=1e-5)

    stored = {}
    replaced = TransformerHooks()
    sae_hooks = AutoencoderHooks(ae.encode, ae.decode)
    sae_hooks.error.append_fwd(_store(stored, "error"))
    sae_hooks.reconstruction.append_fwd(_store(stored, "rec"))
    replaced.resid.torso.delta_mlp.append_fwd(AtLayers(1).append(sae_hooks))
    tdb_xf(tokens, hooks=replaced)
    _, cache = tdb_xf.model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_out")
    x = cache["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(stored["rec"], ae.decode(ae.encode(x)))
    torch.testing.assert_close(stored["error"], x - stored["rec"])


def test_backward_hooks_get_the_gradient(tdb_xf):
    tokens = torch.tensor([[7, 8, 9, 10]])
    grads = {}
    hooks = TransformerHooks()
    hooks.resid.torso.post_mlp.append_bwd(_store(grads))
    logits, _ = tdb_xf(tokens, hooks=hooks)
    logits[0, -1, 3].backward()

    ref = {}

    def keep_grad(grad, hook):
        ref["g"] = grad.clone()

    model = tdb_xf.model
    out = model.run_with_hooks(tokens, bwd_hooks=[("blocks.2.hook_resid_post", keep_grad)])
    out[0, -1, 3].backward()
    torch.testing.assert_close(grads[2], ref["g"])
    assert sorted(grads) == list(range(model.cfg.n_layers))


def _capture_all(xf: Transformer) -> tuple[TransformerHooks, dict]:
    store: dict = {}
    hooks = TransformerHooks()
    for path, fwd_bwd in hooks.locations():
        if path == "attn.qk_softmax_denominator":
            continue

        def keep(xx, *args, _path=path, layer=None, **kwargs):
            store[(_path, layer)] = xx.detach().clone()
            return xx

        fwd_bwd.append_fwd(keep)
    return hooks, store


def _check_locations(model: HookedModel, layer: int, tokens: torch.Tensor) -> None:
    """Every location's value against the mechscope cache and TDB's own formulas."""
    xf = Transformer(model)
    hooks, got = _capture_all(xf)
    logits, _ = xf(tokens, hooks=hooks)
    plain_logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)  # read-only hooks change nothing
    d_head, heads = model.cfg.d_head, model.cfg.n_heads
    root = model.block_part(layer, "attn").scaling ** 0.5
    c = lambda name: cache[f"blocks.{layer}.{name}"]  # noqa: E731
    g = lambda path: got[(path, layer)]  # noqa: E731

    q, k, v = g("attn.q"), g("attn.k"), g("attn.v")
    rot = "rot_" if model.cfg.positional_embedding_type == "rotary" else ""  # TDB's q, k: those the scores use
    torch.testing.assert_close(q, c(f"attn.hook_{rot}q") * root)
    torch.testing.assert_close(k, c(f"attn.hook_{rot}k") * root)
    torch.testing.assert_close(v, c("attn.hook_v"))
    k_full = k.repeat_interleave(heads // k.shape[2], dim=2)
    v_full = v.repeat_interleave(heads // v.shape[2], dim=2)
    logits_qk = torch.einsum("bqhd,bkhd->bqkh", q, k_full)  # TDB's definition: scaled q . scaled k
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()[None, :, :, None]
    causal = causal.expand_as(logits_qk)
    torch.testing.assert_close(g("attn.qk_logits")[causal], logits_qk[causal], rtol=1e-5, atol=1e-5)
    assert torch.isinf(g("attn.qk_logits")[~causal]).all()
    probs = torch.softmax(logits_qk.masked_fill(~causal, float("-inf")), dim=-2)
    torch.testing.assert_close(g("attn.qk_probs"), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g("attn.v_out"), torch.einsum("bqkh,bkhd->bqhd", probs, v_full), rtol=1e-5, atol=1e-5)
    assert g("attn.v_out").shape == (*tokens.shape, heads, d_head)

    torch.testing.assert_close(g("mlp.pre_act"), c("mlp.hook_pre"))
    torch.testing.assert_close(g("mlp.post_act"), c("mlp.hook_post"))

    torch.testing.assert_close(got[("resid.post_emb", None)], cache["blocks.0.hook_resid_pre"])
    norms = {"ln_attn": ("ln1", "hook_resid_pre", model.ln1_w[layer], model.ln1_b[layer])}
    norms["ln_mlp"] = ("ln2", "hook_resid_mid", model.ln2_w[layer], model.ln2_b[layer])
    for tdb, (ours, resid, w, b) in norms.items():
        x = c(resid)
        centred = x - x.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else x
        torch.testing.assert_close(g(f"resid.torso.{tdb}.post_mean_subtraction"), centred)
        norm = model.block_part(layer, ours)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        torch.testing.assert_close(g(f"resid.torso.{tdb}.scale"), scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g(f"resid.torso.{tdb}.post_scale"), centred / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g(f"resid.torso.post_{tdb}"), centred / scale * w + b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g("resid.torso.delta_attn"), c("hook_attn_out"))
    torch.testing.assert_close(g("resid.torso.post_attn"), c("hook_resid_mid"))
    torch.testing.assert_close(g("resid.torso.delta_mlp"), c("hook_mlp_out"))
    torch.testing.assert_close(g("resid.torso.post_mlp"), c("hook_resid_post"))

    x = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    centred = x - x.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else x
    torch.testing.assert_close(got[("resid.ln_f.post_mean_subtraction", None)], centred)
    torch.testing.assert_close(got[("resid.ln_f.scale", None)], cache["ln_final.hook_scale"])
    torch.testing.assert_close(got[("resid.ln_f.post_scale", None)], cache["ln_final.hook_normalized"])
    final = got[("resid.post_ln_f", None)]
    torch.testing.assert_close(final, cache["ln_final.hook_normalized"] * model.ln_final_w + model.ln_final_b)
    torch.testing.assert_close(got[("logits", None)], final @ model.W_U + model.b_U, rtol=1e-5, atol=1e-5)


def test_locations_rmsnorm_gqa(tdb_xf):
    _check_locations(tdb_xf.model, 2, torch.tensor([[1, 50, 99, 7, 23, 200]]))


def test_locations_layernorm_gpt2():
    torch.manual_seed(0)
    model = HookedAutoModel(HookedAutoConfig("gpt2", layer_norm_epsilon=1e-5))
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    _check_locations(model, 1, torch.tensor([[1, 50, 99, 7, 23]]))


def test_edits_flow_downstream():
    torch.manual_seed(0)
    model = HookedAutoModel(HookedAutoConfig("gpt2"))
    xf = Transformer(model)
    tokens = torch.tensor([[4, 8, 15, 16, 23]])

    def attend_first(xx, layer, **kwargs):  # [batch, q, k, head]: every query attends to position 0
        xx.zero_()
        xx[:, :, 0, :] = 1
        return xx

    got = {}
    hooks = TransformerHooks()
    hooks.attn.qk_probs.append_fwd(AtLayers(0).append(attend_first))
    hooks.attn.v.append_fwd(AtLayers(0).append(_store(got, "v")))
    hooks.attn.v_out.append_fwd(AtLayers(0).append(_store(got, "z")))
    xf(tokens, hooks=hooks)
    torch.testing.assert_close(got["z"], got["v"][:, :1].expand_as(got["z"]))

    # scaling the queries by 0 through a returned tensor gives uniform causal attention
    zero_q = TransformerHooks()
    zero_q.attn.q.append_fwd(AtLayers(1).append(lambda xx, layer, **kw: torch.zeros_like(xx)))
    zero_q.attn.qk_probs.append_fwd(AtLayers(1).append(_store(got, "probs")))
    xf(tokens, hooks=zero_q)
    expected = torch.ones(5, 5).tril() / torch.arange(1, 6)[:, None]
    torch.testing.assert_close(got["probs"][0, :, :, 2], expected)


def test_model_context_weights(tdb_folder, tdb_xf):
    ctx = StandardModelContext(str(tdb_folder), device=torch.device("cpu"), model=tdb_xf)
    hf = tdb_xf.model.model
    cfg = tdb_xf.cfg
    layer = hf.model.layers[1]
    d_head = cfg.d_head
    assert (ctx.n_layers, ctx.n_neurons, ctx.n_attention_heads) == (4, 384, 4)
    assert (ctx.n_residual_stream_channels, ctx.n_vocab, ctx.n_context) == (64, 257, 512)

    q = ctx.get_weight(WeightLocationType.ATTN_TO_QUERY, layer=1)
    assert q.shape == (4, 64, d_head)
    torch.testing.assert_close(q[2], layer.self_attn.q_proj.weight[2 * d_head : 3 * d_head].T)
    k = ctx.get_weight(WeightLocationType.ATTN_TO_KEY, layer=1)  # key-value head 1 serves query heads 2, 3
    torch.testing.assert_close(k[3], layer.self_attn.k_proj.weight[d_head : 2 * d_head].T)
    o = ctx.get_weight(WeightLocationType.ATTN_TO_RESIDUAL, layer=1)
    assert o.shape == (4, d_head, 64)
    torch.testing.assert_close(o[2], layer.self_attn.o_proj.weight[:, 2 * d_head : 3 * d_head].T)
    torch.testing.assert_close(ctx.get_weight(WeightLocationType.MLP_TO_HIDDEN, 1), layer.mlp.up_proj.weight.T)
    torch.testing.assert_close(ctx.get_weight(WeightLocationType.MLP_TO_RESIDUAL, 1), layer.mlp.down_proj.weight.T)
    torch.testing.assert_close(ctx.get_weight(WeightLocationType.EMBEDDING), hf.model.embed_tokens.weight)
    torch.testing.assert_close(ctx.get_weight(WeightLocationType.UNEMBEDDING), hf.lm_head.weight.T)
    torch.testing.assert_close(
        ctx.get_weight(WeightLocationType.LAYER_NORM_GAIN_PRE_MLP, 1), layer.post_attention_layernorm.weight
    )
    torch.testing.assert_close(ctx.get_weight(WeightLocationType.LAYER_NORM_GAIN_FINAL), hf.model.norm.weight)
    unit = ctx.get_weight(WeightLocationType.MLP_TO_RESIDUAL, 1, normalize_dim=Dimension.RESIDUAL_STREAM_CHANNELS)
    torch.testing.assert_close(unit, F.normalize(layer.mlp.down_proj.weight.T, dim=1))
    assert not q.requires_grad

    with pytest.raises(ValueError, match="needs a layer"):
        ctx.get_weight(WeightLocationType.ATTN_TO_QUERY)
    with pytest.raises(ValueError, match="out of range"):
        ctx.get_weight(WeightLocationType.ATTN_TO_QUERY, layer=4)
    with pytest.raises(ValueError, match="learned"):
        ctx.get_weight(WeightLocationType.POSITION_EMBEDDING)
    ids = tdb_xf.model.tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert ctx.encode("hi") == ids and len(ids) == 2
    assert ctx.decode_token_list(ids) == ["h", "i"]
    assert ctx.decode(ids) == "hi"
    assert ctx.encode_token_str("h") == ids[0]


def test_rmsnorm_post_mean_subtraction_edit_is_the_norm_input(tdb_xf):
    """RMSNorm has no mean subtraction: an edit there is an edit of ln1's input, as done by hand (to round-off:
    the façade divides by the scale where the HF norm multiplies by its reciprocal)."""
    tokens = torch.tensor([[9, 8, 7, 6, 5]])
    hooks = TransformerHooks()
    hooks.resid.torso.ln_attn.post_mean_subtraction.append_fwd(AtLayers(1).append(lambda xx, layer, **kw: xx * 3))
    edited, _ = tdb_xf(tokens, hooks=hooks)

    norm = tdb_xf.model.model.model.layers[1].input_layernorm
    handle = norm.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    try:
        by_hand = tdb_xf.model.model(tokens).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(edited, tdb_xf.model.model(tokens).logits)


def test_each_layer_runs_its_own_copy_of_the_hooks():
    """As TDB's run_torso (``deepcopy(hooks).bind(layer=i)`` per layer): per-layer locations run copies of hook
    objects, so an object's own state stays as it was, while functions (not copied) and AutoencoderHooks'
    encode/decode (kept by reference, TDB's ``__deepcopy__``) are shared; the final locations run the originals."""

    class Counter:
        def __init__(self):
            self.layers = []

        def __call__(self, xx, layer=None, **kwargs):
            self.layers.append(layer)
            return xx

    xf = reference_transformer()
    per_layer, final, closure_seen = Counter(), Counter(), []
    ae = Autoencoder(n_latents=8, n_inputs=xf.cfg.d_ff)
    hooks = TransformerHooks()
    hooks.mlp.pre_act.append_fwd(per_layer)
    hooks.mlp.pre_act.append_fwd(_store(closure_seen))
    hooks.mlp.post_act.append_fwd(AtLayers(1).append(AutoencoderHooks(ae.encode, ae.decode)))  # bound methods
    hooks.logits.append_fwd(final)
    logits, _ = xf(torch.tensor([[1, 2, 3]]), hooks=hooks)
    assert per_layer.layers == [] and final.layers == [None]
    assert closure_seen == list(range(xf.cfg.n_layers))
    logits.sum().backward()
    assert ae.encoder.weight.grad is not None  # the one autoencoder, not a per-layer copy, was used
    xf.zero_grad()

    bound = TransformerHooks()
    bound.mlp.pre_act.append_fwd(lambda xx, **kwargs: xx)
    bound.bind(layer=0)
    with pytest.raises(ValueError, match="already bound"):
        xf(torch.tensor([[1, 2, 3]]), hooks=bound)


def test_backward_hooks_of_one_location_run_last_appended_first():
    """TDB wraps each backward hook in its own identity function, applied in order: the backward pass meets them
    in reverse, each getting the gradient the later one returned."""
    xf = reference_transformer()
    seen = []

    def first(grad, **kwargs):
        seen.append(("first", grad.abs().sum().item()))
        return grad

    def second(grad, **kwargs):
        seen.append(("second", grad.abs().sum().item()))
        return grad * 2

    hooks = TransformerHooks()
    hooks.resid.post_ln_f.append_bwd(first).append_bwd(second)
    logits, _ = xf(torch.tensor([[1, 2, 3]]), hooks=hooks)
    logits.sum().backward()
    xf.zero_grad()
    assert [name for name, _ in seen] == ["second", "first"]
    assert seen[1][1] == pytest.approx(2 * seen[0][1])  # first got the gradient second returned


def test_layernorm_post_mean_subtraction_edit_is_tdbs_norm_by_hand():
    """On a LayerNorm model an edit ``y`` of ``post_mean_subtraction`` goes on as TDB's Norm: ``y / sqrt(mean(y²) +
    eps) * weight + bias``, with no second mean subtraction (closed form, on the ln_2 output of layer 3); the
    residual stream itself is not changed."""
    xf = reference_transformer()
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    got = {}
    hooks = TransformerHooks()
    hooks.resid.torso.ln_mlp.post_mean_subtraction.append_fwd(AtLayers(3).append(lambda xx, **kw: xx.add_(0.3)))
    hooks.resid.torso.post_ln_mlp.append_fwd(AtLayers(3).append(_store(got, "out")))
    hooks.resid.torso.post_attn.append_fwd(AtLayers(3).append(_store(got, "resid")))
    hooks.resid.torso.post_mlp.append_fwd(AtLayers(3).append(_store(got, "resid_after")))
    hooks.resid.torso.delta_mlp.append_fwd(AtLayers(3).append(_store(got, "delta")))
    with torch.no_grad():
        xf(tokens, hooks=hooks)
    x = got["resid"]
    y = x - x.mean(-1, keepdim=True) + 0.3
    ln = xf.xf_layers[3].ln_2
    torch.testing.assert_close(got["out"], y / (y.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt() * ln.weight + ln.bias)
    torch.testing.assert_close(got["resid_after"], x + got["delta"])  # the in-place edit did not touch the residual


def test_in_place_post_mean_subtraction_edit_leaves_the_rmsnorm_residual(tdb_xf):
    """The RMSNorm input is the residual stream itself: the hooks get a copy, so an in-place edit changes the
    norm's path only (resid_mid = resid_pre + attn_out still holds)."""
    got = {}
    hooks = TransformerHooks()
    hooks.resid.post_emb.append_fwd(_store(got, "pre"))
    hooks.resid.torso.ln_attn.post_mean_subtraction.append_fwd(AtLayers(0).append(lambda xx, **kw: xx.mul_(3)))
    hooks.resid.torso.delta_attn.append_fwd(AtLayers(0).append(_store(got, "delta")))
    hooks.resid.torso.post_attn.append_fwd(AtLayers(0).append(_store(got, "mid")))
    with torch.no_grad():
        edited, _ = tdb_xf(torch.tensor([[1, 2, 3]]), hooks=hooks)
    torch.testing.assert_close(got["mid"], got["pre"] + got["delta"])
    assert not torch.allclose(edited, tdb_xf(torch.tensor([[1, 2, 3]]))[0])
