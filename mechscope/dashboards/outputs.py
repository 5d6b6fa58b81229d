"""Dashboards on disk: ``dashboards.safetensors`` (every tensor of :class:`~mechscope.dashboards.build.Dashboards`)
and ``dashboards.json`` (the settings, token count and what they were computed from). Both are written atomically;
safetensors can be read one tensor at a time (:func:`read_tensor`), which is how the explorer reads them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.dashboards.build import Dashboards, DashboardSettings, Examples
from mechscope.dashboards.logit_effects import LogitEffects
from mechscope.dashboards.neuronpedia import MAX_FEATURES, saedashboard_batches, skipped_indexes, upload_batch
from mechscope.files import atomic_write, atomic_write_json

TENSORS = "dashboards.safetensors"
META = "dashboards.json"
VOCAB = "vocab.json"  # the token strings, so nothing that shows dashboards needs the tokenizer
FORMAT_VERSION = 1


def _flat(dash: Dashboards) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for group in ("top", "bins"):
        for f in dataclasses.fields(Examples):
            out[f"{group}.{f.name}"] = getattr(getattr(dash, group), f.name)
    for f in dataclasses.fields(LogitEffects):
        out[f"logits.{f.name}"] = getattr(dash.logits, f.name)
    for name in ("bin_edges", "bin_counts", "firing", "max_activation", "histogram", "histogram_edges"):
        out[name] = getattr(dash, name)
    return {k: v.contiguous() for k, v in out.items()}


def save_dashboards(directory: str | Path, dash: Dashboards, source: dict[str, Any], vocab: list[str]) -> Path:
    """Write ``dash`` into ``directory``; ``source`` (JSON-able: model, hook, SAE, store settings) says what it was
    computed from, and a resumed run compares it; ``vocab`` is the string of every token id. Returns the
    directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _flat(dash)
    atomic_write(directory / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(directory / VOCAB, vocab, indent=None)
    meta = {
        "version": FORMAT_VERSION,
        "settings": dataclasses.asdict(dash.settings),
        "source": source,
        "n_tokens": dash.n_tokens,
        "d_sae": dash.d_sae,
    }
    atomic_write_json(directory / META, meta)
    return directory


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


def read_tensor(directory: str | Path, name: str) -> Tensor:
    """One tensor of the dashboards file (``"top.values"``, ``"firing"``, ...), without reading the others."""
    with safe_open(str(Path(directory) / TENSORS), framework="pt") as f:
        return f.get_tensor(name)


def load_dashboards(directory: str | Path) -> Dashboards:
    """The dashboards :func:`save_dashboards` wrote into ``directory``."""
    meta = read_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no {META} in {directory}: run the dashboards stage first")
    t = load_file(str(Path(directory) / TENSORS))

    def examples(group: str) -> Examples:
        return Examples(**{f.name: t[f"{group}.{f.name}"] for f in dataclasses.fields(Examples)})

    logits = LogitEffects(**{f.name: t[f"logits.{f.name}"] for f in dataclasses.fields(LogitEffects)})
    return Dashboards(
        settings=DashboardSettings(**meta["settings"]),
        top=examples("top"),
        bins=examples("bins"),
        bin_edges=t["bin_edges"],
        bin_counts=t["bin_counts"],
        firing=t["firing"],
        n_tokens=meta["n_tokens"],
        max_activation=t["max_activation"],
        histogram=t["histogram"],
        histogram_edges=t["histogram_edges"],
        logits=logits,
    )


def write_neuronpedia_export(
    out_dir: str | Path,
    dash: Dashboards,
    vocab: list[str],
    W_dec: Tensor,  # noqa: N803 (the SAE's name)
    *,
    model_id: str,
    layer: int,
    sae_set: str,
    batch_size: int = MAX_FEATURES,
) -> list[Path]:
    """Write ``out_dir/saedashboard/`` (``batch-N.json``, ``skipped_indexes.json``, ``run_settings.json``, as
    SAEDashboard's Neuronpedia runner does) and ``out_dir/upload/batch-N.json`` (bodies for Neuronpedia's
    upload-batch route, source ``"{layer}-{sae_set}"``). Returns the files written."""
    out = Path(out_dir)
    for sub in ("saedashboard", "upload"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    written = []
    for i, batch in enumerate(
        saedashboard_batches(dash, vocab, W_dec, model_id=model_id, layer=layer, sae_set=sae_set, batch_size=batch_size)
    ):
        written.append(atomic_write_json(out / "saedashboard" / f"batch-{i}.json", batch, indent=None))
        written.append(
            atomic_write_json(
                out / "upload" / f"batch-{i}.json", upload_batch(batch, f"{layer}-{sae_set}"), indent=None
            )
        )
    skipped = skipped_indexes(dash, model_id=model_id, layer=layer, sae_set=sae_set)
    written.append(atomic_write_json(out / "saedashboard" / "skipped_indexes.json", skipped))
    settings = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "n_tokens": dash.n_tokens}
    written.append(
        atomic_write_json(out / "saedashboard" / "run_settings.json", {**settings, **dataclasses.asdict(dash.settings)})
    )
    return written
