"""Input checks shared by the tools: token ids from any input; layer, head, position and token indices in range; a
metric's value."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
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


def check_position(position: object, n_pos: int, what: str = "position") -> int:
    """``position`` if it indexes a sequence of ``n_pos`` tokens (``-n_pos..n_pos-1``); otherwise a ``ValueError``."""
    if (
        isinstance(position, (bool, np.bool_))
        or not isinstance(position, (int, np.integer))
        or not (-n_pos <= int(position) < n_pos)
    ):
        raise ValueError(
            f"{what}={position!r} is out of range for {n_pos} tokens: valid positions are {-n_pos}..{n_pos - 1}"
        )
    return int(position)


def check_token_ids(model: Any, ids: object, what: str = "target") -> torch.Tensor:
    """``ids`` (an int, a list or an integer tensor) as a long tensor if every one is in the model's vocabulary;
    otherwise an error naming the first bad id and the valid range."""
    t = torch.as_tensor(ids)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integer token ids, got {ids!r}")
    d_vocab = model.cfg.d_vocab
    bad = t[(t < 0) | (t >= d_vocab)]
    if bad.numel():
        raise ValueError(f"{what} token id {int(bad[0])} is out of range: valid ids are 0..{d_vocab - 1}")
    return t.long()


def metric_value(value: object, what: str = "metric") -> float:
    """The number a metric returned (a float or a one-element tensor); otherwise an error saying what it gave."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the {what} must return one number (a scalar tensor or a float), got a tensor of shape "
                f"{tuple(value.shape)}: reduce it, e.g. with .mean()"
            )
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"the {what} must return one number (a scalar tensor or a float), got {type(value).__name__}")


def check_nonnegative(value: object, what: str) -> float:
    """``value`` if it is a finite number >= 0 (a threshold such as ``eps``); otherwise a ``ValueError``."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"{what}={value!r} must be a finite number >= 0")
    return float(value)
