"""Where a dashboards folder keeps its files, and their light readers: numpy and JSON only, so the explorer reads
finished dashboards without importing torch. The writers and the checkpoint's readers are in
:mod:`mechscope.dashboards.outputs`.

A dashboards folder holds ``dashboards.safetensors`` (every tensor of
:class:`~mechscope.dashboards.build.Dashboards`), ``vocab.json`` (the string of every token id) and
``dashboards.json`` (settings, token count, source; written last, so its presence means the run finished). While a
run is under way it also holds ``checkpoint/`` with ``state.safetensors`` and ``state.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

TENSORS = "dashboards.safetensors"
META = "dashboards.json"
VOCAB = "vocab.json"  # the token strings, so nothing that shows dashboards needs the tokenizer
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint"  # the folder of a run under way
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_META = "state.json"
NO_TOKEN = -1  # the token id of a window slot past the ends of its context


def find_dashboards(root: str | Path, depth: int = 3) -> list[Path]:
    """Every folder at most ``depth`` levels under ``root`` that holds finished dashboards, sorted."""
    root = Path(root)
    return sorted(p.parent for d in range(depth + 1) for p in root.glob("*/" * d + META))


def read_meta(directory: str | Path) -> dict[str, Any] | None:
    """``dashboards.json`` of ``directory``, or None when there is none (the tensors file is written first, so the
    metadata's presence means the run finished)."""
    path = Path(directory) / META
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete the folder and run the dashboards stage again") from e


def read_vocab(directory: str | Path) -> list[str]:
    """The token strings saved with the dashboards (index: token id)."""
    return json.loads((Path(directory) / VOCAB).read_text())


def read_array(directory: str | Path, name: str) -> np.ndarray:
    """One tensor of the dashboards file (``"top.values"``, ``"firing"``, ...) as a numpy array, without reading
    the others."""
    with safe_open(str(Path(directory) / TENSORS), framework="np") as f:
        return f.get_tensor(name)
