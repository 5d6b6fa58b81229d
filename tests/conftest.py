"""Tiny random models of every supported family, each wrapped once per test session."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: fail fast instead of retrying


import pytest
import torch
from transformers import AutoModelForCausalLM

from mechscope import HookedAutoConfig, HookedModel

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
    torch.set_num_threads(1)

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]

# Smaller than the HookedAutoConfig defaults where it speeds the suite up; vocab stays >= 50257.
_TEST_OVERRIDES = {"gpt2": {}, "gpt_neox": {"use_parallel_residual": True}}


def build_pair(family: str, seed: int = 0, **overrides) -> tuple[HookedModel, torch.nn.Module]:
    """``(hooked, plain)``: a wrapped random model and an untouched copy of the same HF model."""
    torch.manual_seed(seed)
    cfg = HookedAutoConfig(family, **{**_TEST_OVERRIDES.get(family, {}), **overrides})
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    plain = copy.deepcopy(hf)
    # random init leaves some biases and norm weights at 0/1; perturb them so tests see their effect
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    plain.load_state_dict(hf.state_dict())
    return HookedModel(hf), plain


@pytest.fixture(scope="session", params=FAMILIES)
def pair(request) -> tuple[HookedModel, torch.nn.Module]:
    return build_pair(request.param)


@pytest.fixture(scope="session")
def llama() -> HookedModel:
    return build_pair("llama", seed=1)[0]


@pytest.fixture(scope="session")
def gpt2() -> HookedModel:
    return build_pair("gpt2", seed=2)[0]


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50256, (2, 12), generator=torch.Generator().manual_seed(0))


def torch_hook_count(model: torch.nn.Module) -> int:
    """Every PyTorch module hook on the model (forward, pre-forward, backward)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
