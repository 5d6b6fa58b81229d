"""Input checks shared by the tools: token ids from any input, and layer and head indices in range."""

from __future__ import annotations

from typing import Any

import torch

from mechscope.models.tokenizer import Input, tokenize


def as_tokens(model: Any, input_ids: Input) -> torch.Tensor:
    """``[batch, pos]`` token ids on the model's device (``[pos]`` and texts of equal length accepted).

    Texts of different lengths are refused: padding would enter every per-position statistic.
    """
    tokens, mask = tokenize(model.tokenizer, input_ids)
    if mask is not None:
        raise ValueError("the sequences have different lengths; pass them one at a time or as equal-length token ids")
    return tokens.to(model.device)


def check_layer(model: Any, layer: object, what: str = "layer") -> int:
    """``layer`` if it is a block index ``0..n_layers-1``; otherwise a ``ValueError`` giving that range."""
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"{what}={layer!r} is out of range: valid layers are 0..{n - 1}")
    return layer


def check_head(model: Any, head: object, what: str = "head") -> int:
    """``head`` if it is a head index ``0..n_heads-1``; otherwise a ``ValueError`` giving that range."""
    n = model.cfg.n_heads
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n:
        raise ValueError(f"{what}={head!r} is out of range: valid heads are 0..{n - 1}")
    return head
