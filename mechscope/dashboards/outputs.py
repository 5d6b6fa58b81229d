"""Dashboards on disk: ``dashboards.safetensors`` (every tensor of :class:`~mechscope.dashboards.build.Dashboards`)
and ``dashboards.json`` (the settings, token count and what they were computed from). Both are written atomically;
safetensors can be read one tensor at a time (:func:`mechscope.dashboards.layout.read_array`, which is how the
explorer reads them, without torch). The file names are :mod:`mechscope.dashboards.layout`'s.

While a run is under way its ``out_dir`` holds ``checkpoint/``: ``state.safetensors`` (every tensor of a
:class:`~mechscope.dashboards.build.DashboardState`) and ``state.json`` (its pass and chunk key, and the settings and
source it was computed under), replaced as a whole (:func:`mechscope.files.atomic_dir`), so a kill leaves the old
checkpoint or the new one."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.dashboards.build import Dashboards, DashboardSettings, DashboardState, Examples
from mechscope.dashboards.layout import (
    CHECKPOINT,
    CHECKPOINT_META,
    CHECKPOINT_TENSORS,
    FORMAT_VERSION,
    META,
    TENSORS,
    VOCAB,
    read_meta,
)
from mechscope.dashboards.logit_effects import LogitEffects
from mechscope.dashboards.neuronpedia import MAX_FEATURES, saedashboard_batches, skipped_indexes, upload_batch
from mechscope.files import atomic_dir, atomic_write, atomic_write_json, recover_dir, remove_stale_temps
from mechscope.sae.formats import WriteFile


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


def _json(data: Any, indent: int | None = 1) -> Callable[[Path], object]:
    return lambda tmp: tmp.write_text(json.dumps(data, indent=indent), encoding="utf-8")


def save_dashboards(
    directory: str | Path,
    dash: Dashboards,
    source: dict[str, Any],
    vocab: list[str],
    write_file: WriteFile = atomic_write,
) -> Path:
    """Write ``dash`` into ``directory``; ``source`` (JSON-able: model, hook, SAE, store settings) says what it was
    computed from, and a rerun compares it; ``vocab`` is the string of every token id. Each file is written by
    ``write_file(path, write)`` (default :func:`~mechscope.files.atomic_write`), the metadata last. Returns the
    directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _flat(dash)
    write_file(directory / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    write_file(directory / VOCAB, _json(vocab, indent=None))
    meta = {
        "version": FORMAT_VERSION,
        "settings": dataclasses.asdict(dash.settings),
        "source": source,
        "n_tokens": dash.n_tokens,
        "d_sae": dash.d_sae,
    }
    write_file(directory / META, _json(meta))
    return directory


def remove_stale_files(directory: str | Path) -> list[Path]:
    """Remove what a killed run left half-written in ``directory`` (temporary files of the dashboards' files and of
    the checkpoint; :func:`mechscope.files.remove_stale_temps`), and finish a checkpoint swap a kill interrupted
    (:func:`mechscope.files.recover_dir`). Returns what it removed."""
    directory = Path(directory)
    removed = [p for name in (TENSORS, VOCAB, META, CHECKPOINT) for p in remove_stale_temps(directory / name)]
    recover_dir(directory / CHECKPOINT)
    return removed


# ---- the checkpoint of a run under way ---------------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path, state: DashboardState, about: dict[str, Any], write_file: WriteFile = atomic_write
) -> Path:
    """Write ``state`` to ``directory/checkpoint/`` (replaced as a whole): its tensors, and as JSON its pass, chunk
    key and settings with ``about`` (JSON-able: the source and what else a resume must match). Each file is
    written by ``write_file``. Returns the checkpoint folder."""
    tensors = {k: v.contiguous() for k, v in state.tensors().items()}
    meta = {
        "version": FORMAT_VERSION,
        "pass": state.pass_number,
        "key": state.key,
        "settings": dataclasses.asdict(state.settings),
        **about,
    }

    def write(tmp: Path) -> None:
        write_file(tmp / CHECKPOINT_TENSORS, lambda t: save_file(tensors, str(t)))
        write_file(tmp / CHECKPOINT_META, _json(meta))

    return atomic_dir(Path(directory) / CHECKPOINT, write)


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any] | None:
    """The JSON of the checkpoint in ``directory`` (pass, key, settings and what :func:`save_checkpoint` was told),
    or None when there is none."""
    path = Path(directory) / CHECKPOINT / CHECKPOINT_META
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): delete {path.parent} to compute from scratch") from e


def load_checkpoint(directory: str | Path) -> DashboardState:
    """The state :func:`save_checkpoint` wrote into ``directory``."""
    meta = read_checkpoint_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no dashboards checkpoint in {directory}")
    path = Path(directory) / CHECKPOINT / CHECKPOINT_TENSORS
    try:
        tensors = load_file(str(path))
    except (SafetensorError, FileNotFoundError) as e:
        raise OSError(f"{path} cannot be read ({e}): delete {path.parent} to compute from scratch") from e
    return DashboardState.from_tensors(DashboardSettings(**meta["settings"]), meta["pass"], meta["key"], tensors)


def remove_checkpoint(directory: str | Path) -> None:
    """Delete the checkpoint in ``directory`` (once the dashboards it led to are written)."""
    shutil.rmtree(Path(directory) / CHECKPOINT, ignore_errors=True)


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
