"""Issue 13: loading a model from a bad path, folder, file, architecture or dtype is refused naming the fix."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, T5Config

from mechscope import HookedAutoConfig, HookedModel
from mechscope.models import loading
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.sae import SAEConfig, SparseAutoencoder, load_sae, save_sae
from mechscope.sae.formats import SAEFormatError


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny random llama saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = HookedModel(HookedAutoConfig("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def test_a_path_that_does_not_exist_says_so_not_repo_id_syntax(tmp_path):
    for missing in (tmp_path / "nope", Path("./no/such/model/dir")):
        with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))} does not exist: pass an existing"):
            HookedModel.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist: check the path"):
        HookedModel.from_pretrained(str(tmp_path / "x.gguf"))


def test_an_empty_folder_is_not_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config.json \(it holds nothing\).*model.save_pretrained"):
        HookedModel.from_pretrained(str(tmp_path))


def test_a_folder_without_tokenizer_files_warns_naming_how_to_save_it(saved, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(saved / file, bare / file)
    with pytest.warns(UserWarning, match=re.escape("tokenizer.save_pretrained(folder)")):
        model = HookedModel.from_pretrained(str(bare))
    assert model.to_tokens("ab").tolist() == [byte_tokenizer()("ab")["input_ids"]]


def test_a_config_json_path_loads_its_folder_and_other_files_name_the_folder(saved):
    tokens = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        want = HookedModel.from_pretrained(str(saved))(tokens)
        assert torch.equal(HookedModel.from_pretrained(str(saved / "config.json"))(tokens), want)
    with pytest.raises(ValueError, match=f"is a file: pass the folder .*{re.escape(str(saved))}"):
        HookedModel.from_pretrained(str(saved / "model.safetensors"))


def test_a_truncated_safetensors_file_is_named(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is truncated or damaged .*download the model"):
        HookedModel.from_pretrained(str(broken))


def test_a_truncated_or_garbage_gguf_file_is_named(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=f"{re.escape(str(garbage))} is not a readable GGUF file.*convert it again"):
        HookedModel.from_pretrained(str(garbage))
    real = loading.smollm2_gguf_path()
    if real is not None:  # the first 3 MB of a real file: a valid header, tensors cut off
        cut = tmp_path / "cut.gguf"
        with real.open("rb") as f:
            cut.write_bytes(f.read(3_000_000))
        with pytest.raises(ValueError, match=r"cut\.gguf is not a readable GGUF file"):
            HookedModel.from_pretrained(str(cut))


def test_an_unsupported_architecture_names_the_supported_families(tmp_path):
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    AutoModelForSeq2SeqLM.from_config(t5).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        HookedModel.from_pretrained(str(tmp_path))
    message = str(err.value)
    assert "is an encoder-decoder 't5' model (T5Config)" in message
    assert "decoder-only families gemma, gemma2, gpt2, gpt_neox, llama" in message
    assert len(message) < 400  # not transformers' list of every causal-LM config


@pytest.mark.parametrize("bad", ["float31", "int8", "auto", torch.int64, 16])
def test_an_unknown_dtype_lists_the_accepted_ones(saved, bad):
    with pytest.raises(ValueError, match=r"unknown dtype .*'float32', 'float', 'float64'.*'bfloat16'"):
        HookedModel.from_pretrained(str(saved), dtype=bad)


def test_dtype_names_with_a_torch_prefix_are_read():
    assert loading._dtype("torch.float16") is torch.float16
    assert loading._dtype("half") is torch.float16
    assert loading._dtype(None) is torch.float32


def test_stop_at_layer_takes_numpy_and_torch_integers_and_refuses_floats_and_strings(llama):
    tokens = torch.tensor([[1, 2, 3]])
    want = llama(tokens, stop_at_layer=1)
    for same in (np.int64(1), np.int32(1), torch.tensor(1), -1):
        assert torch.equal(llama(tokens, stop_at_layer=same), want)
    for bad in (1.0, "1", torch.tensor(1.0), True, np.float64(1)):
        with pytest.raises(TypeError, match=r"stop_at_layer must be an int in -2..2 .*pass int\(value\)"):
            llama(tokens, stop_at_layer=bad)


def test_an_attention_mask_of_the_wrong_shape_or_values_is_refused(llama):
    tokens = torch.tensor([[1, 2, 3]])
    for bad in (torch.ones(1, 2), torch.ones(2, 3), torch.ones(3)):
        with pytest.raises(ValueError, match=r"attention_mask has shape .* the tokens have shape \(1, 3\): pass a"):
            llama(tokens, attention_mask=bad)
        with pytest.raises(ValueError, match="pass a mask"):
            llama.run_with_cache(tokens, attention_mask=bad)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        llama(tokens, attention_mask=torch.tensor([[1, 2, 1]]))
    with pytest.raises(TypeError, match="attention_mask must be a torch tensor"):
        llama(tokens, attention_mask=[[1, 1, 1]])
    assert torch.equal(llama(tokens, attention_mask=torch.ones(1, 3, dtype=torch.bool)), llama(tokens))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tensor", ["W_enc", "b_dec"])
def test_sae_weights_with_nan_or_inf_are_refused_on_load_naming_tensor_and_file(tmp_path, bad, tensor):
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_post"))
    folder = save_sae(sae, tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(weights)
    tensors[tensor].view(-1)[3] = bad
    save_file(tensors, weights)
    with pytest.raises(SAEFormatError, match=f"{re.escape(str(weights))}: {tensor} holds 1 NaN or infinite values"):
        load_sae(folder)


def test_a_truncated_sae_file_is_named_with_the_fix(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_post"))
    folder = save_sae(sae, tmp_path / "sae")
    for file in (folder / "sae_weights.safetensors", folder / "cfg.json"):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        with pytest.raises(SAEFormatError, match=f"{re.escape(str(file))} .*truncated.*: download, copy or save the"):
            load_sae(folder)
        file.write_bytes(data)
    assert torch.equal(load_sae(folder).W_enc, sae.W_enc)
