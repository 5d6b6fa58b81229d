"""SVDInterpreter against a dense SVD written out from the HF modules, and against TransformerLens's own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.tools.svd import SVDInterpreter
from tests.conftest import build_pair


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma"])
def model(request):
    return build_pair(request.param)[0]


def dense_matrix(model, vector_type: str, layer: int, head: int | None) -> torch.Tensor:
    """The ``[rows, d_model]`` matrix whose right singular vectors are read, from the HF modules' weights."""
    c, gpt2, d = model.cfg, model.cfg.family == "gpt2", model.cfg.d_head
    block = model.model.transformer.h[layer] if gpt2 else model.model.model.layers[layer]
    if vector_type == "OV":
        if gpt2:  # Conv1D weights are [in, out]; c_attn is [q | k | v]
            w_v = block.attn.c_attn.weight[:, 2 * c.d_model + head * d : 2 * c.d_model + (head + 1) * d]
            w_o = block.attn.c_proj.weight[head * d : (head + 1) * d]
        else:  # Linear weights are [out, in]; query head h reads kv head h // (n_heads / n_kv_heads)
            kv = head // (c.n_heads // c.n_key_value_heads)
            w_v = block.self_attn.v_proj.weight[kv * d : (kv + 1) * d].T
            w_o = block.self_attn.o_proj.weight[:, head * d : (head + 1) * d].T
        return w_v @ w_o
    if vector_type == "w_in":  # W_in^T with the ln2 multiplier on its columns; Gemma's norm multiplies by 1 + w
        if gpt2:
            return block.mlp.c_fc.weight.T * block.ln_2.weight
        offset = 1.0 if c.family == "gemma" else 0.0
        return block.mlp.up_proj.weight * (block.post_attention_layernorm.weight + offset)
    return block.mlp.c_proj.weight if gpt2 else block.mlp.down_proj.weight.T


def by_hand(model, vector_type: str, layer: int, head: int | None, num_vectors: int) -> torch.Tensor:
    """``[d_vocab, 1, num_vectors]``: the top right singular vectors of the dense matrix times the unembedding."""
    vh = torch.linalg.svd(dense_matrix(model, vector_type, layer, head)).Vh
    return (vh[:num_vectors] @ model.model.lm_head.weight.T).T[:, None]


def assert_equal_up_to_sign(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Columns ``[..., i]`` equal up to one sign each (a singular vector's sign is arbitrary)."""
    assert got.shape == expected.shape
    signs = torch.sign((got * expected).sum(dim=(0, 1), keepdim=True))
    torch.testing.assert_close(got, expected * signs, atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(
    ("vector_type", "layer", "head", "num_vectors"),
    [("OV", 0, 0, 10), ("OV", 1, 3, 16), ("w_in", 1, None, 10), ("w_out", 0, None, 64)],
)
def test_singular_vectors_match_a_dense_svd(model, vector_type, layer, head, num_vectors):
    got = SVDInterpreter(model).get_singular_vectors(vector_type, layer, num_vectors=num_vectors, head_index=head)
    assert got.shape == (model.cfg.d_vocab, 1, num_vectors)
    assert_equal_up_to_sign(got, by_hand(model, vector_type, layer, head, num_vectors))


def transformer_lens_layout(model) -> nn.Module:
    """A module whose parameters carry TransformerLens's names (``blocks.L.attn.W_V``, ``unembed.W_U``, ...)."""
    root = nn.Module()
    root.cfg = model.cfg
    root.unembed = nn.Module()
    root.unembed.W_U = nn.Parameter(model.W_U.detach())
    root.blocks = nn.ModuleList()
    for layer in range(model.cfg.n_layers):
        block = nn.Module()
        for part, params in {
            "attn": {"W_V": model.W_V[layer], "W_O": model.W_O[layer]},
            "mlp": {"W_in": model.W_in[layer], "W_out": model.W_out[layer]},
            "ln2": {"w": model.ln2_w[layer]},
        }.items():
            holder = nn.Module()
            for name, value in params.items():
                setattr(holder, name, nn.Parameter(value.detach()))
            setattr(block, part, holder)
        root.blocks.append(block)
    return root


@torch.no_grad()
def test_same_as_transformer_lens_svd_interpreter(model):
    import transformer_lens as tl  # in the dev extra: this cross-check must run, never skip

    reference = tl.SVDInterpreter(transformer_lens_layout(model))
    ours = SVDInterpreter(model)
    for args in [("OV", 1, 6, 2), ("w_in", 0, 8, None), ("w_out", 1, 5, None)]:
        assert_equal_up_to_sign(ours.get_singular_vectors(*args), reference.get_singular_vectors(*args))


def fake_pysvelte(shown: list[dict]) -> SimpleNamespace:
    """Stand-in for PySvelte (a notebook widget): ``TopKTable(...).show()`` records the top-k tokens it would show."""

    class TopKTable:
        def __init__(self, tokens, activations, obj_type, k, filter):
            self.table = dict(tokens=tokens, activations=activations, obj_type=obj_type, k=k, filter=filter)

        def show(self):
            top = self.table["activations"][:, 0].topk(self.table["k"], dim=0).indices  # [k, n_directions]
            self.table["top_tokens"] = [[self.table["tokens"][i] for i in col] for col in top.T.tolist()]
            shown.append(self.table)

    return SimpleNamespace(TopKTable=TopKTable)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformer_lens_docstring_example(family):
    """TransformerLens's SVDInterpreter docstring example, with a tiny mechscope model for gpt2-medium
    (layer 1 head 3 for layer 22 head 10, which the tiny model does not have)."""
    shown: list[dict] = []
    pysvelte = fake_pysvelte(shown)

    # --- the example ---
    model = build_pair(family)[0]  # HookedTransformer.from_pretrained('gpt2-medium')
    svd_interpreter = SVDInterpreter(model)

    ov = svd_interpreter.get_singular_vectors("OV", layer_index=1, head_index=3)

    all_tokens = [model.to_str_tokens(np.array([i])) for i in range(model.cfg.d_vocab)]
    all_tokens = [all_tokens[i][0] for i in range(model.cfg.d_vocab)]

    def plot_matrix(matrix, tokens, k=10, filter="topk"):
        pysvelte.TopKTable(tokens=all_tokens, activations=matrix, obj_type="SVD direction", k=k, filter=filter).show()

    plot_matrix(ov, all_tokens)
    # --- end of the example ---

    assert len(all_tokens) == model.cfg.d_vocab
    assert all_tokens[int(model.to_tokens("A", prepend_bos=False)[0, 0])] == "A"
    (table,) = shown
    assert table["activations"] is ov and ov.shape == (model.cfg.d_vocab, 1, 10)
    expected = by_hand(model, "OV", 1, 3, 10)
    expected = expected * torch.sign((ov * expected).sum(dim=(0, 1), keepdim=True))
    top = expected[:, 0].topk(10, dim=0).indices.T.tolist()
    assert table["top_tokens"] == [[all_tokens[i] for i in col] for col in top]


def test_clear_errors(llama):
    svd = SVDInterpreter(llama)
    with pytest.raises(ValueError, match="vector_type must be one of OV, w_in, w_out; got 'QK'"):
        svd.get_singular_vectors("QK", 0, head_index=0)
    with pytest.raises(ValueError, match="needs head_index"):
        svd.get_singular_vectors("OV", 0)
    with pytest.raises(ValueError, match=r"head_index=4 is out of range: this model has 4 heads, valid are 0\.\.3"):
        svd.get_singular_vectors("OV", 0, head_index=4)
    with pytest.raises(ValueError, match=r"layer_index=2 is out of range: this model has 2 layers, valid are 0\.\.1"):
        svd.get_singular_vectors("w_out", 2)
    with pytest.raises(ValueError, match="layer_index=-1 is out of range"):
        svd.get_singular_vectors("w_in", -1)
    with pytest.raises(ValueError, match="head_index applies to 'OV' only"):
        svd.get_singular_vectors("w_in", 0, head_index=1)
    with pytest.raises(ValueError, match=r"has 16 singular vectors; ask for 1\.\.16"):
        svd.get_singular_vectors("OV", 0, num_vectors=17, head_index=0)
