"""Loading and saving SAEs: the readers and the writer of :mod:`mechscope.sae.formats` with a
:class:`~mechscope.sae.model.SparseAutoencoder` on the other side.

``load_sae`` (any format, in eval mode) and ``save_sae`` are ``SparseAutoencoder.load`` and ``.save``; the loaders of
one format each return the SAE that format's file describes (in training mode, as ``from_tensors`` builds it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechscope.files import atomic_write
from mechscope.sae.formats import (
    WriteFile,
    read_gemma_scope,
    read_openai,
    read_openai_state_dict,
    read_saelens,
    read_sparsify,
)
from mechscope.sae.model import SparseAutoencoder
from mechscope.settings import device_problem


def load_sae(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> SparseAutoencoder:
    """Load the SAE at ``path`` in whichever format it is (``detect_format``), in eval mode.

    ``dtype`` defaults to the stored dtype; ``device`` to the CPU, whatever the stored config says.
    """
    problem = device_problem(str(device))
    if problem is not None:
        raise ValueError(f"load_sae(device=...): {problem}")
    return SparseAutoencoder.load(path, device=device, dtype=dtype)


def save_sae(
    sae: SparseAutoencoder, path: str | Path, *, overwrite: bool = False, write_file: WriteFile = atomic_write
) -> Path:
    """Write ``sae`` to the directory ``path`` as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6's layout);
    returns ``path``. See :func:`mechscope.sae.formats.write_saelens`."""
    return sae.save(path, overwrite=overwrite, write_file=write_file)


def load_saelens(path: str | Path) -> SparseAutoencoder:
    """The SAE of a mechscope / SAELens directory (:func:`~mechscope.sae.formats.read_saelens`)."""
    return SparseAutoencoder.from_tensors(*read_saelens(path))


def load_sparsify(path: str | Path) -> SparseAutoencoder:
    """The SAE of an EleutherAI sparsify directory (:func:`~mechscope.sae.formats.read_sparsify`)."""
    return SparseAutoencoder.from_tensors(*read_sparsify(path))


def load_gemma_scope(
    path: str | Path, *, model_name: str | None = None, hook_name: str | None = None
) -> SparseAutoencoder:
    """The SAE of a Gemma Scope ``params.npz`` or its directory (:func:`~mechscope.sae.formats.read_gemma_scope`)."""
    return SparseAutoencoder.from_tensors(*read_gemma_scope(path, model_name=model_name, hook_name=hook_name))


def load_openai(path: str | Path, *, layer_norm: bool | None = None) -> SparseAutoencoder:
    """The SAE of an OpenAI sparse_autoencoder / Transformer Debugger state dict file
    (:func:`~mechscope.sae.formats.read_openai`)."""
    return SparseAutoencoder.from_tensors(*read_openai(path, layer_norm=layer_norm))


def openai_state_dict_to_sae(
    state: dict[str, Any], source: str | Path = "state dict", layer_norm: bool | None = None
) -> SparseAutoencoder:
    """The SAE of an OpenAI ``Autoencoder.state_dict()`` in memory
    (:func:`~mechscope.sae.formats.read_openai_state_dict`)."""
    return SparseAutoencoder.from_tensors(*read_openai_state_dict(state, source, layer_norm))


__all__ = [
    "load_gemma_scope",
    "load_openai",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "openai_state_dict_to_sae",
    "save_sae",
]
