"""The dashboards stage: load the model and the SAE, make sure the activations are harvested, compute every latent's
dashboard and write it (``mechscope dashboards CONFIG``, and the main job's ``dashboards`` stage).

A finished run in ``out_dir`` is reused when it was computed with the same settings and refused (naming the
differences) when not. A run under way writes ``out_dir/checkpoint/`` (the state of its passes, its pass and chunk
key, its settings and source; :mod:`mechscope.dashboards.outputs`) every ``checkpoint_every`` chunks or
``checkpoint_seconds`` seconds, whichever comes first; a rerun after a kill continues from it (the chunks since it
are read again) and gives exactly the uninterrupted result, and refuses, naming the differences, when the settings,
the source or the stored rows differ. The dashboards' files are written at the end, atomically, and then the
checkpoint is deleted; what a kill left half-written is removed when the next run starts.

Under torchrun the ranks share the chunks and merge exactly (:func:`run_dashboards`); every rank stops at the same
chunk on Ctrl-C / SIGTERM, and a run killed in any rank resumes from the last checkpoint under any number of ranks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

import mechscope.distributed as distributed
from mechscope.dashboards.build import (
    N_PASSES,
    PASS_NAMES,
    Chunks,
    Dashboards,
    DashboardSettings,
    DashboardState,
    feed_chunk,
    finish_dashboards,
)
from mechscope.dashboards.layout import CHECKPOINT, find_dashboards, read_meta, read_vocab
from mechscope.dashboards.outputs import (
    load_checkpoint,
    load_dashboards,
    read_checkpoint_meta,
    remove_checkpoint,
    remove_stale_files,
    save_checkpoint,
    save_dashboards,
    write_neuronpedia_export,
)
from mechscope.data.store import ActivationStore
from mechscope.files import atomic_write, check_settings
from mechscope.interrupts import Cadence, StopFlag, stop_on_signals
from mechscope.models.hooked import HookedModel
from mechscope.models.names import is_attention_map, parse_hook
from mechscope.models.tokenizer import token_strings
from mechscope.sae.formats import WriteFile
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.splice import check_trained_hook, resolve_hook_name
from mechscope.settings import (
    Config,
    ConfigError,
    at_least,
    check_device,
    check_fields,
    check_hook_names,
    check_paths,
    meta,
)


@dataclass
class DashboardsConfig(Config):
    """Where the dashboards come from and go; ``[dashboards]`` says what they hold."""

    sae: str | None = field(default=None, metadata=meta("the SAE: a directory in any supported format", required=True))
    model: str = field(default="smollm2-135m", metadata=meta("model: short name, hub id, local dir or .gguf"))
    hook_name: str | None = field(default=None, metadata=meta("hook point of the SAE; default: the SAE's own"))
    allow_hook_mismatch: bool = field(
        default=False, metadata=meta("run the SAE at a hook_name other than the one it was trained on (on purpose)")
    )
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
    checkpoint_every: int = field(
        default=0,
        metadata=meta("chunks (activation shards; per rank under torchrun) between checkpoints of a run; 0: by time"),
    )
    checkpoint_seconds: float = field(
        default=60.0,
        metadata=meta("seconds between checkpoints of a run (a killed run resumes from the last); 0: by chunks only"),
    )
    dashboards: DashboardSettings = field(default_factory=DashboardSettings, metadata=meta("what each dashboard holds"))

    LABEL: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, 1, "n_tokens", "context_length", "batch_contexts")
        at_least(self, 0, "checkpoint_every", "checkpoint_seconds")
        check_device(self, "device")
        check_hook_names(self, "hook_name")
        check_paths(self, "out_dir")


def _source(config: DashboardsConfig, hook_name: str, store: ActivationStore, sae: SparseAutoencoder) -> dict[str, Any]:
    """What the dashboards are computed from, as the metadata records it (paths relative to ``out_dir``)."""
    return {
        "model": config.model,
        "hook_name": hook_name,
        "sae": os.path.relpath(Path(str(config.sae)).resolve(), Path(config.out_dir).resolve()),
        "sae_sha256": sae.fingerprint(),
        "neuronpedia_id": sae.cfg.neuronpedia_id,
        "activations": store.settings(),
    }


def _resume(config: DashboardsConfig, about: dict[str, Any]) -> DashboardState | None:
    """The checkpoint's state in ``out_dir``, after checking it was written under the same settings and source; None
    when there is none."""
    stored = read_checkpoint_meta(config.out_dir)
    if stored is None:
        return None
    path = Path(config.out_dir) / CHECKPOINT
    check_settings(
        {**stored["settings"], **stored["source"], "stored_tokens": stored["stored_tokens"]},
        {**dataclasses.asdict(config.dashboards), **about["source"], "stored_tokens": about["stored_tokens"]},
        where=path,
        what="was written by a dashboards run",
        fix=f"restore those settings to resume, or delete {path} to compute the dashboards from scratch",
        labels="checkpoint, now",
    )
    state = load_checkpoint(config.out_dir)
    distributed.print_main(f"dashboards: resuming pass {state.pass_number} at chunk {state.key} from {path}")
    return state


def run_dashboards(
    config: DashboardsConfig,
    model: HookedModel | None = None,
    sae: SparseAutoencoder | None = None,
    *,
    on_chunk: Callable[[DashboardState], object] | None = None,
    write_file: WriteFile = atomic_write,
) -> Dashboards:
    """Compute (or reuse, or resume) the dashboards ``config`` asks for; ``model`` / ``sae`` skip loading them.

    ``on_chunk(state)`` is called after every chunk of every pass this rank reads, before a checkpoint is written;
    an exception it raises ends the run as a kill would, so a test can check that the next run resumes to the
    uninterrupted result. ``write_file(path, write)`` writes each file of the checkpoints and of the result (default
    :func:`~mechscope.files.atomic_write`), for tests that kill a write half-way.

    Under torchrun (:mod:`mechscope.distributed`) rank ``r`` reads every ``world_size``-th chunk from the ``r``-th
    (in rounds of one chunk per rank); at every checkpoint the ranks' states are merged on rank 0, which writes the
    checkpoint one process would write after the same chunks (so a run resumes under any number of ranks), and at the
    end of every pass on every rank. The merge is exact, so the dashboards are bit for bit those of one process;
    every rank returns them, rank 0 writes them. Missing activations are harvested by the ranks together
    (:meth:`~mechscope.data.store.ActivationStore.harvest` with ``data_parallel``).
    """
    if config.sae is None and sae is None:
        raise ConfigError('sae is required: the SAE\'s directory (sae = "path" in the file, or --sae)', field="sae")
    sae = sae if sae is not None else SparseAutoencoder.load(str(config.sae), device=config.device)
    hook_name = resolve_hook_name(sae, config.hook_name)
    model = model if model is not None else HookedModel.from_pretrained(config.model, device=config.device)
    model.points.resolve(hook_name)  # an unknown name raises here, listing the closest valid ones
    if is_attention_map(hook_name):
        raise ValueError(
            f"dashboards cannot be built at {hook_name!r}: it is an attention map [batch, head, query_pos, key_pos], "
            "with no vector per token. Dashboards support the hooks with one vector per token: the residual stream "
            "(hook_resid_pre/mid/post), hook_attn_out, hook_mlp_out, mlp.hook_pre/post, attn.hook_z/q/k/v (heads "
            "flattened): train the SAE on one of those"
        )
    check_trained_hook(sae, hook_name, config.allow_hook_mismatch)
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
    out_dir = Path(config.out_dir)
    if out_dir.is_dir() and distributed.is_main():
        remove_stale_files(out_dir)
    done = read_meta(out_dir)
    if done is not None:
        check_settings(
            {**done["settings"], **done["source"]},
            {**settings, **source},
            where=out_dir,
            what="holds dashboards computed",
            fix="use another out_dir, or delete it to compute them again",
            labels="there, now",
        )
        if distributed.is_main():
            remove_checkpoint(out_dir)  # left by a kill after the result was written
        return load_dashboards(out_dir)
    if distributed.broadcast(store.stored_tokens() == 0):  # rank 0 decides: the others may see its harvest start
        store.harvest(config.n_tokens, progress=config.progress, data_parallel=True)  # each rank harvests its share
    about = {"source": source, "stored_tokens": store.stored_tokens()}
    state = _resume(config, about) or DashboardState.start(sae.cfg.d_sae, config.dashboards)
    if not distributed.is_main():
        state = state.restart_pass()  # rank 0 holds the checkpoint's pass so far; the others add their chunks to it
    due = Cadence(config.checkpoint_every, config.checkpoint_seconds)
    progress = config.progress and distributed.is_main()
    with stop_on_signals() as stop:  # Ctrl-C / SIGTERM: finish the round, write a checkpoint, raise Interrupted

        def after_round(state: DashboardState, checkpoint: bool, signum: int) -> DashboardState:
            if checkpoint or signum:
                state = _checkpoint(out_dir, state, about, write_file)
            if signum:  # a rank the signal did not reach stops as well, with the others' signal
                where = f"pass {state.pass_number} of {N_PASSES}, chunk {state.key}"
                raise stop.interrupted("dashboards", out_dir / CHECKPOINT, where, signum=signum)
            return state

        while True:
            state = _shared_pass(state, sae, hook_name, store.chunks, (due, stop), progress, on_chunk, after_round)
            state = distributed.combine_all(state, DashboardState.merge)  # every rank needs the whole pass
            if state.pass_number == N_PASSES:
                break
            state = state.next_pass()
        dash = finish_dashboards(state, sae.W_dec.detach(), model.W_U, model.ln_final_w)
        if distributed.is_main():
            save_dashboards(out_dir, dash, source, token_strings(model.tokenizer, model.cfg.d_vocab), write_file)
            remove_checkpoint(out_dir)
    return dash


def _shared_pass(
    state: DashboardState,
    sae: SparseAutoencoder,
    hook_name: str,
    chunks: Chunks,
    when: tuple[Cadence, StopFlag],
    progress: bool,
    on_chunk: Callable[[DashboardState], object] | None,
    after_round: Callable[[DashboardState, bool, int], DashboardState],
) -> DashboardState:
    """Feed ``state``'s pass this rank's share of the chunks from ``state.key`` on, in rounds of one chunk per rank
    (rank ``r`` takes the ``r``-th chunk of each round; one process, one chunk a round), and return it with the
    pass done on this rank. After every round all ranks have the key after the round's last chunk and call
    ``after_round(state, checkpoint, signum)`` together; it returns the state to go on from. ``when`` is the
    cadence of checkpoints (it counts rounds; its seconds run apart on each rank) and the stop flag: ``checkpoint``
    is true on every rank when due on any, and ``signum`` is the stop signal any rank got (0: none), so every rank
    stops at the same chunk."""
    due, stop = when
    world = distributed.world_size()
    own = iter(chunks(state.key + distributed.rank(), step=world))
    desc = f"dashboards {state.pass_number}/{N_PASSES}: {PASS_NAMES[state.pass_number]}"
    with closing(tqdm(desc=desc, unit="chunk", disable=not progress)) as bar:
        while True:
            start, item = state.key, next(own, None)
            if item is not None:
                key, rows = item
                feed_chunk(state, sae, hook_name, rows)
                state.key = key
                if on_chunk is not None:
                    on_chunk(state)
            ends = (state.key, item is not None and due(), stop.signum or 0)
            reached, checkpoint, signum = distributed.combine_all(ends, _round_end)
            if checkpoint:
                due.restart()  # a checkpoint is written: every rank counts from now
            bar.update(reached - start)
            state.key = reached  # the key after the round's last chunk, on every rank
            state = after_round(state, checkpoint, signum)
            if reached < start + world:  # a rank found no chunk of its own: the chunks are done
                return state


def _round_end(a: tuple[int, bool, int], b: tuple[int, bool, int]) -> tuple[int, bool, int]:
    """Two ranks' (key after their chunk, checkpoint due, stop signal or 0) joined: the furthest key, due on either,
    either's signal."""
    return max(a[0], b[0]), a[1] or b[1], a[2] or b[2]


def _checkpoint(out_dir: Path, state: DashboardState, about: dict[str, Any], write_file: WriteFile) -> DashboardState:
    """Merge the ranks' states on rank 0, which writes the checkpoint (the file one process writes at this chunk),
    and return the state to go on from: the merge on rank 0, this pass restarted on the others."""
    merged = distributed.gather_to_main(state, DashboardState.merge)
    if merged is None:
        return state.restart_pass()
    save_checkpoint(out_dir, merged, about, write_file)
    return merged


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
