"""TransformerLens's ``HookedTransformer`` on the same weights, driven in its own venv.

TransformerLens 4 (the dev extra) dropped ``HookedTransformer``; 3.x ships it and lives next to sae-lens in the
reference venv that ``bash run.sh test`` makes (``.venv-saelens``; its python is exported as
``MECHSCOPE_REFERENCE_PYTHON``). :func:`reference_values` saves the HF models (``save_pretrained``) and the inputs
in a temporary folder, runs ``tl_worker.py`` there once for all the runs of a test module (once per test session,
however pytest-xdist distributes the tests), and returns what TransformerLens computed. Without the reference venv
the calling test fails, naming the command that makes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("tl_worker.py")
VENV_HINT = (
    "the TransformerLens 3.x reference venv is missing: `bash run.sh test` makes it (.venv-saelens) and exports "
    "MECHSCOPE_REFERENCE_PYTHON; or point MECHSCOPE_REFERENCE_PYTHON at a python with transformer_lens<4"
)


def reference_python() -> str:
    """The reference venv's python: ``$MECHSCOPE_REFERENCE_PYTHON``, else ``.venv-saelens`` of the repository root
    Fails the test when there is none."""
    given = os.environ.get("MECHSCOPE_REFERENCE_PYTHON")
    if given:
        if not Path(given).exists():
            pytest.fail(f"MECHSCOPE_REFERENCE_PYTHON={given} does not exist; {VENV_HINT}")
        return given
    candidate = ROOT / ".venv-saelens" / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    pytest.fail(VENV_HINT)


def save_for_reference(hf: PreTrainedModel, folder: Path) -> None:
    """``save_pretrained`` with the one field real GPT-2 checkpoints carry and random configs lack (``n_ctx``, which
    TransformerLens's GPT-2 config conversion reads)."""
    if hf.config.model_type == "gpt2" and not hasattr(hf.config, "n_ctx"):
        hf.config.n_ctx = hf.config.n_positions
    hf.save_pretrained(folder)


def _key(models: dict[str, PreTrainedModel], inputs: dict[str, torch.Tensor], request: dict) -> str:
    """A digest of everything the answer depends on: the request, the inputs and every model's config and weights."""
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode())
    for name, tensor in [*inputs.items(), *((f"{k}/{n}", t) for k, hf in models.items() for n, t in _weights(hf))]:
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    for hf in models.values():
        digest.update(hf.config.to_json_string().encode())
    return digest.hexdigest()[:16]


def _weights(hf: PreTrainedModel) -> list[tuple[str, torch.Tensor]]:
    return sorted(hf.state_dict().items())


def reference_values(
    tmp_path_factory: pytest.TempPathFactory,
    models: dict[str, PreTrainedModel],
    inputs: dict[str, torch.Tensor],
    runs: list[dict],
    act_names: Sequence[tuple] = (),
) -> tuple[dict[str, torch.Tensor], dict]:
    """TransformerLens's values for ``runs`` (see ``tl_worker.py``), and its metadata (``act_names``, ``fired``).

    ``models`` maps the name runs use to an HF model. The answer is computed once per test session: pytest-xdist
    workers share one folder, and the first to ask runs the worker while the others wait for its answer (a file
    lock), so the reference venv starts once however the tests are distributed.
    """
    model_dirs = {key: f"m{i}" for i, key in enumerate(models)}
    request = {
        "inputs": "inputs.safetensors",
        "runs": [{**run, "model": model_dirs[run["model"]]} for run in runs],
        "act_names": [list(a) for a in act_names],
    }
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: every worker's parent
    folder = shared / f"transformer_lens-{_key(models, inputs, request)}"
    folder.mkdir(parents=True, exist_ok=True)
    answer = folder / "answer.safetensors"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not answer.exists():
            _run_worker(folder, models, model_dirs, inputs, request)
    with safe_open(str(answer), "pt") as f:
        raw = f.metadata() or {}
    metadata = {k: json.loads(v) if k != "transformer_lens" else v for k, v in raw.items()}
    if not metadata.get("transformer_lens", "").startswith("3."):
        pytest.fail(f"the reference is TransformerLens {metadata.get('transformer_lens')}, not 3.x; {VENV_HINT}")
    return load_file(str(answer)), metadata


def _run_worker(folder: Path, models, model_dirs: dict[str, str], inputs: dict[str, torch.Tensor], request: dict):
    for key, hf in models.items():
        save_for_reference(hf, folder / model_dirs[key])
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
    (folder / "request.json").write_text(json.dumps(request))
    python = reference_python()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)  # the reference venv must not see this checkout
    done = subprocess.run(
        [python, str(WORKER), "request.json", "answer.partial.safetensors"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        pytest.fail(f"the TransformerLens worker failed ({python}):\n{done.stderr[-4000:]}", pytrace=False)
    (folder / "answer.partial.safetensors").rename(folder / "answer.safetensors")  # whole answers only
