"""The worker's end of :func:`harness.start_worker`'s protocol, for the scripts a peer's own venv runs
(``saelens_side.py``, ``sparsify_side.py``, ``saelens_harvest_side.py``), and the training spec the SAE-training
workers read; it imports no mechscope (those venvs have none) and torch only to read the spec's tensors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def serve(step: Callable[[], object], ready: dict) -> None:
    """Print ``ready`` as one JSON line, then call ``step()`` for each ``step`` line on stdin and answer ``done``."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            raise ValueError(f"expected 'step', got {line!r}")
        step()
        print("done", flush=True)


def training_spec(path: str) -> tuple[dict[str, Any], list[Any], dict[str, Any], int, int]:
    """The spec ``sae_training.py`` wrote to ``path``, with torch set to its threads: ``(spec, batches, init, d_sae,
    d_in)``, the batches ``[batch_size, d_in]`` and the initial weights (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``)."""
    import torch
    from safetensors.torch import load_file

    with open(path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    batches = list(load_file(spec["activations"])["activations"].split(spec["batch_size"]))
    init = load_file(spec["init"])
    d_sae, d_in = init["W_dec"].shape
    return spec, batches, init, d_sae, d_in
