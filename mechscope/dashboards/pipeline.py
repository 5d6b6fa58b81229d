"""The dashboards stage: load the model and the SAE, make sure the activations are harvested, compute every latent's
dashboard and write it (``mechscope dashboards CONFIG``, and the main job's ``dashboards`` stage).

A finished run in ``out_dir`` is reused when it was computed with the same settings and refused (naming the
differences) when not; the stage writes its files only at the end, atomically, so a kill leaves no half-written
result and a rerun starts the passes again (they take seconds to a minute).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mechscope.dashboards.build import Dashboards, DashboardSettings, compute_dashboards
from mechscope.dashboards.outputs import (
    find_dashboards,
    load_dashboards,
    read_meta,
    read_vocab,
    save_dashboards,
    write_neuronpedia_export,
)
from mechscope.data.store import ActivationStore
from mechscope.files import check_settings
from mechscope.models.hooked import HookedModel
from mechscope.models.names import parse_hook
from mechscope.models.tokenizer import token_strings
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.splice import resolve_hook_name
from mechscope.settings import Config, ConfigError, at_least, check_fields, meta


@dataclass
class DashboardsConfig(Config):
    """Where the dashboards come from and go; ``[dashboards]`` says what they hold."""

    sae: str | None = field(default=None, metadata=meta("the SAE: a directory in any supported format", required=True))
    model: str = field(default="smollm2-135m", metadata=meta("model: short name, hub id, local dir or .gguf"))
    hook_name: str | None = field(default=None, metadata=meta("hook point of the SAE; default: the SAE's own"))
    activations_dir: str | None = field(
        default=None, metadata=meta("harvested activations to read (harvested there first when missing)")
    )
    corpus: str | None = field(default=None, metadata=meta("corpus of a harvest (mechscope.data.iter_texts)"))
    n_tokens: int = field(default=131072, metadata=meta("tokens to harvest when the activations are not there"))
    context_length: int = field(default=128, metadata=meta("tokens per context of a harvest"))
    batch_contexts: int = field(default=8, metadata=meta("contexts per forward pass of a harvest"))
    out_dir: str = field(default="dashboards", metadata=meta("where dashboards.safetensors/.json go"))
    device: str = field(default="cpu", metadata=meta("device of the model and the SAE"))
    progress: bool = field(default=True, metadata=meta("show progress bars"))
    dashboards: DashboardSettings = field(default_factory=DashboardSettings, metadata=meta("what each dashboard holds"))

    LABEL: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, 1, "n_tokens", "context_length", "batch_contexts")


def _source(config: DashboardsConfig, hook_name: str, store: ActivationStore, sae: SparseAutoencoder) -> dict[str, Any]:
    """What the dashboards are computed from, as the metadata records it (paths relative to ``out_dir``)."""
    return {
        "model": config.model,
        "hook_name": hook_name,
        "sae": os.path.relpath(Path(str(config.sae)).resolve(), Path(config.out_dir).resolve()),
        "neuronpedia_id": sae.cfg.neuronpedia_id,
        "activations": store.settings(),
    }


def run_dashboards(
    config: DashboardsConfig, model: HookedModel | None = None, sae: SparseAutoencoder | None = None
) -> Dashboards:
    """Compute (or reuse) the dashboards ``config`` asks for; ``model`` / ``sae`` skip loading them."""
    if config.sae is None and sae is None:
        raise ConfigError('sae is required: the SAE\'s directory (sae = "path" in the file, or --sae)', field="sae")
    model = model if model is not None else HookedModel.from_pretrained(config.model, device=config.device)
    sae = sae if sae is not None else SparseAutoencoder.load(str(config.sae), device=config.device)
    hook_name = resolve_hook_name(sae, config.hook_name)
    activations = Path(config.activations_dir or Path(config.out_dir) / "activations")
    store = ActivationStore(
        model,
        hook_name,
        config.corpus,
        context_length=config.context_length,
        batch_contexts=config.batch_contexts,
        activations_dir=activations,
    )
    source = _source(config, hook_name, store, sae)
    settings = dataclasses.asdict(config.dashboards)
    done = read_meta(config.out_dir)
    if done is not None:
        check_settings(
            {**done["settings"], **done["source"]},
            {**settings, **source},
            where=config.out_dir,
            what="holds dashboards computed",
            fix="use another out_dir, or delete it to compute them again",
            labels="there, now",
        )
        return load_dashboards(config.out_dir)
    if store.stored_tokens() == 0:
        store.harvest(config.n_tokens, progress=config.progress)
    dash = compute_dashboards(
        sae, hook_name, store.chunks, model.W_U, model.ln_final_w, config.dashboards, progress=config.progress
    )
    save_dashboards(config.out_dir, dash, source, token_strings(model.tokenizer, model.cfg.d_vocab))
    return dash


def export_neuronpedia(
    results_dir: str | Path, out_dir: str | Path, model_id: str | None = None, sae_set: str = "mechscope"
) -> list[Path]:
    """Write every dashboards folder under ``results_dir`` in Neuronpedia's formats
    (:func:`~mechscope.dashboards.outputs.write_neuronpedia_export`), one folder per SAE under ``out_dir``; the
    model id defaults to the model's name. Returns the files written."""
    found = find_dashboards(results_dir)
    if not found:
        raise FileNotFoundError(f"no dashboards under {results_dir}: run `mechscope dashboards CONFIG` first")
    written = []
    for folder in found:
        meta = read_meta(folder)
        assert meta is not None  # find_dashboards lists finished runs only
        source = meta["source"]
        sae = SparseAutoencoder.load(folder / source["sae"])
        layer = parse_hook(source["hook_name"]).layer
        name = model_id or Path(str(source["model"])).name
        written += write_neuronpedia_export(
            Path(out_dir) / folder.name,
            load_dashboards(folder),
            read_vocab(folder),
            sae.W_dec,
            model_id=name,
            layer=layer if layer is not None else 0,
            sae_set=sae_set,
        )
    return written
