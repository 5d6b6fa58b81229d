"""The activation edits both sides of the TransformerLens comparison apply: imported by the tests (as
``tests.models.edits``) and by ``tl_worker.py`` in the reference venv (as ``edits``, from its own folder), so it
needs only torch."""

from __future__ import annotations

import torch


def edit_fn(edit: dict):
    """The hook function of one edit spec: ``x * edit["scale"] + edit["shift"]`` on head ``edit["head"]`` (dim 2 of
    ``[batch, pos, head, ...]``) or, without a head, on the whole activation."""
    head, scale, shift = edit.get("head"), edit["scale"], edit["shift"]

    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        if head is None:
            return x * scale + shift
        x = x.clone()
        x[:, :, head] = x[:, :, head] * scale + shift
        return x

    return fn
