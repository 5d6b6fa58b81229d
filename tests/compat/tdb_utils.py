"""Helpers for the mechscope.compat.tdb tests: OpenAI-format autoencoder state dicts."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch


def openai_state_dict(d_in: int, n_latents: int, seed: int = 0, topk: int | None = None) -> dict:
    """A random autoencoder in the OpenAI / Transformer Debugger layout (plain tensors and strings)."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "pre_bias": 0.1 * torch.randn(d_in, generator=gen),
        "latent_bias": 0.1 * torch.randn(n_latents, generator=gen),
        "encoder.weight": torch.randn(n_latents, d_in, generator=gen) / d_in**0.5,
        "decoder.weight": torch.randn(d_in, n_latents, generator=gen) / n_latents**0.5,
        "stats_last_nonzero": torch.zeros(n_latents, dtype=torch.long),
        "latents_activation_frequency": torch.rand(n_latents, generator=gen) + 0.01,
        "latents_mean_square": torch.rand(n_latents, generator=gen),
        "activation": "ReLU" if topk is None else "TopK",
        "activation_state_dict": {} if topk is None else {"k": topk, "postact_fn": "ReLU"},
    }
    return state


REFERENCE_FILE = Path(__file__).parent / "data" / "tdb_reference.pt"


@cache
def reference() -> dict[str, torch.Tensor]:
    """The values Transformer Debugger's own code computed (``tdb_reference.py`` regenerates the file)."""
    return torch.load(REFERENCE_FILE, weights_only=True)


def reference_part(prefix: str) -> dict[str, torch.Tensor]:
    """The reference entries under ``prefix/``, with the prefix removed."""
    return {k.removeprefix(prefix + "/"): v for k, v in reference().items() if k.startswith(prefix + "/")}
