"""The end-to-end main job: a first look at the model, an SAE trained (or reused) on its residual stream, and the
SAE latent co-occurrence pipeline on top of it.

``run_main_job()`` (``mechscope demo`` on the command line) runs, on SmolLM2-135M offline by default:

1. ``look``: top next tokens, a logit lens and a greedy continuation for one prompt
   (:func:`mechscope.apps.first_look.run_first_look`);
2. ``sae``: harvest activations at ``hook_name`` from the embedded corpus into disk shards, train a TopK SAE on
   them, and evaluate it on held-out contexts. A finished SAE in ``out_dir`` is reused; an interrupted training run
   resumes from its checkpoint, and an interrupted harvest from its last shard;
3. ``cooc``: count latent co-occurrence over the same harvested activations (resuming an interrupted count, skipping
   a finished one), build the Jaccard graphs and their subgraphs, and run the subspace PCA
   (:mod:`mechscope.cooccurrence.pipeline`). Its config is written to ``out_dir/cooc.toml`` first, so
   ``mechscope cooc run out_dir/cooc.toml`` repeats it.

Everything lands under ``out_dir``; the job prints where, and each stage's wall time (also in
``out_dir/timings.json``, which ``benchmarks/main_job.py`` reads).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from mechscope.apps.first_look import DEFAULT_MODEL, DEFAULT_PROMPT, load_and_report, run_first_look
from mechscope.apps.tables import format_graph_summary, format_table
from mechscope.cooccurrence.config import CoocConfig, CountingConfig, PCAConfig
from mechscope.cooccurrence.pipeline import run_all
from mechscope.dashboards.pipeline import DashboardsConfig, run_dashboards
from mechscope.data.store import ActivationStore
from mechscope.files import atomic_write_json, check_settings
from mechscope.models.hooked import HookedModel
from mechscope.sae.evaluate import evaluate_sae
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.train import (
    RESUMABLE_CHANGES,
    SAE_DIR,
    TRAIN_CONFIG_FILE,
    TrainConfig,
    current_names,
    find_checkpoint,
    train_sae,
)
from mechscope.settings import (
    Config,
    ConfigError,
    at_least,
    check_fields,
    check_hook_names,
    check_paths,
    derive,
    fail,
    meta,
)

STAGES = ("look", "sae", "dashboards", "cooc")
TIMINGS_FILE = "timings.json"  # in out_dir: the wall time of each stage of the last run (write_timings)


def _job_training() -> TrainConfig:
    """The job's SAE: a TopK SAE trained on 131,072 harvested tokens (model, hook, context length and paths are
    set by the job)."""
    return TrainConfig(
        n_tokens=131072,
        batch_size_tokens=1024,
        architecture="topk",
        expansion_factor=8,
        k=32,
        lr=1e-3,
        warmup_steps=10,
        shuffle_buffer=32768,
        dead_tokens_threshold=65536,
        log_every=16,
        checkpoint_every=32,
    )


def _job_cooccurrence() -> CoocConfig:
    """The job's co-occurrence pipeline: the first 32 x 4096 harvested rows at thresholds 0 and 10, PCA of two
    subgraphs per size (model, SAE, hook, context length and paths are set by the job)."""
    return CoocConfig(
        CountingConfig(model=DEFAULT_MODEL, n_batches=32, batch_size_tokens=4096, activation_thresholds=[0, 10]),
        pca=PCAConfig(candidates_per_size=2),
    )


@dataclass
class MainJobConfig(Config):
    """Settings of the main job; the defaults are the SmolLM2-135M run documented in the README.

    It nests the SAE training run (``train``, a :class:`TrainConfig`) and the co-occurrence pipeline (``cooc``, a
    :class:`CoocConfig`) and sets what they share from its own fields (:meth:`derived`): the model, the hook, the
    context length and the paths under ``out_dir``. ``mechscope demo`` has one flag per setting (``--top-k 3``,
    ``--train.n-tokens 65536``, ``--cooc.counting.n-batches 8`` ...) and reads a TOML file of them
    (``--config job.toml``, with tables ``[train]`` and ``[cooc.counting]`` ...).
    """

    model: str = field(default=DEFAULT_MODEL, metadata=meta("model: short name, hub id, local dir or .gguf"))
    prompt: str = field(default=DEFAULT_PROMPT, metadata=meta("the prompt of the first look"))
    out_dir: str = field(default="demo_output", metadata=meta("where everything goes"))
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata=meta("stages to run: any of look, sae, dashboards, cooc")
    )
    top_k: int = field(default=5, metadata=meta("look: how many next tokens to list"))
    max_new_tokens: int = field(default=10, metadata=meta("look: length of the greedy continuation"))
    hook_name: str = field(default="blocks.15.hook_resid_post", metadata=meta("sae, cooc: the hook point"))
    context_length: int = field(default=128, metadata=meta("sae, cooc: tokens per corpus context"))
    eval_contexts: int = field(default=32, metadata=meta("sae: held-out contexts for the evaluation"))
    train: TrainConfig = field(
        default_factory=_job_training,
        metadata=meta(
            "sae: the training run (model, hook_name, context_length, activations_dir, out_dir and resume are the "
            "job's)",
            moved={
                "sae_tokens": "n_tokens",
                "batch_size": "batch_size_tokens",
                **{name: name for name in ("expansion_factor", "k", "lr")},
            },
        ),
    )
    dashboards: DashboardsConfig = field(
        default_factory=DashboardsConfig,
        metadata=meta(
            "dashboards: every latent's dashboard over the harvested activations (model, SAE, paths are the job's)"
        ),
    )
    cooc: CoocConfig = field(
        default_factory=_job_cooccurrence,
        metadata=meta(
            "cooc: the pipeline over the harvested activations (model, SAE, hook, corpus, context length and paths "
            "are the job's)",
            moved={
                "activation_thresholds": "counting.activation_thresholds",
                "cooc_batches": "counting.n_batches",
                "cooc_batch_tokens": "counting.batch_size_tokens",
                "min_subgraph_size": "analysis.min_subgraph_size",
                "max_subgraph_size": "analysis.max_subgraph_size",
                "candidate_sizes": "pca.candidate_sizes",
                "candidates_per_size": "pca.candidates_per_size",
            },
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise fail(self, "stages", f"has unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
        check_hook_names(self, "hook_name")
        check_paths(self, "out_dir")
        at_least(self, 1, "top_k", "max_new_tokens", "context_length", "eval_contexts")
        derive(self)  # the nested configs check themselves again, now rather than after the training
        counted = self.cooc.counting.n_batches * self.cooc.counting.batch_size_tokens
        if counted > self.train.n_tokens:
            raise ConfigError(
                f"cooc.counting.n_batches * cooc.counting.batch_size_tokens = {counted} exceeds the "
                f"{self.train.n_tokens} harvested tokens (train.n_tokens): lower one or raise train.n_tokens",
                field="cooc.counting.n_batches",
            )

    def derived(self) -> dict[str, Any]:
        """What the training run and the pipeline share, set from the job's fields: the pipeline reads the shards
        the training harvested and the SAE it trained (absolute paths, so ``out_dir/cooc.toml`` works from any
        directory)."""
        out = Path(self.out_dir)
        shards, training = out / "activations", out / "sae_training"
        return {
            "train.model": self.model,
            "train.hook_name": self.hook_name,
            "train.context_length": self.context_length,
            "train.activations_dir": str(shards),
            "train.out_dir": str(training),
            "train.resume": False,  # train_or_reuse_sae resumes when a checkpoint is there
            "cooc.counting.model": self.model,
            "cooc.counting.sae": str((training / SAE_DIR).resolve()),
            "cooc.counting.hook_names": [self.hook_name],
            "cooc.counting.corpus": self.train.corpus,
            "cooc.counting.context_length": self.context_length,
            "cooc.counting.activations_dir": str(shards.resolve()),
            "cooc.results_dir": str((out / "cooc").resolve()),
            "dashboards.model": self.model,
            "dashboards.sae": str((training / SAE_DIR).resolve()),
            "dashboards.hook_name": self.hook_name,
            "dashboards.activations_dir": str(shards.resolve()),
            "dashboards.corpus": self.train.corpus,
            "dashboards.context_length": self.context_length,
            "dashboards.out_dir": str((out / "dashboards").resolve()),
        }

    @property
    def sae_dir(self) -> Path:
        """Where the trained SAE is (``train.out_dir/sae``)."""
        return Path(self.train.out_dir) / SAE_DIR


def train_or_reuse_sae(model: HookedModel, job: MainJobConfig) -> tuple[SparseAutoencoder, bool]:
    """The job's SAE: loaded from ``job.sae_dir`` when a finished run is there, else trained (resuming an
    interrupted run from its checkpoint). Returns ``(sae, reused)``."""
    config = job.train
    saved = Path(config.out_dir) / TRAIN_CONFIG_FILE
    if saved.exists():
        check_settings(
            current_names(json.loads(saved.read_text())),
            dataclasses.asdict(config),
            where=config.out_dir,
            what="holds an SAE trained",
            fix="use another out_dir, or the same settings",
            labels="there, now",
            ignore=RESUMABLE_CHANGES,
        )
    if job.sae_dir.exists():
        return SparseAutoencoder.load(job.sae_dir), True
    resume = find_checkpoint(config.out_dir) is not None
    return train_sae(dataclasses.replace(config, resume=resume), model=model), False


def held_out_tokens(model: HookedModel, job: MainJobConfig) -> torch.Tensor:
    """``[eval_contexts, context_length]``: the corpus contexts right after the harvested ones (never trained on)."""
    train = job.train
    store = ActivationStore(
        model,
        job.hook_name,
        train.corpus,
        context_length=job.context_length,
        batch_contexts=train.batch_contexts,
        activations_dir=train.activations_dir,
    )
    contexts = list(islice(store.contexts(skip=store.harvested_contexts()), job.eval_contexts))
    if not contexts:
        raise ValueError("the corpus has no contexts left after the harvested ones for the SAE's evaluation")
    return torch.stack(contexts)


def evaluate_job_sae(model: HookedModel, sae: SparseAutoencoder, job: MainJobConfig, reused: bool) -> dict:
    """The SAE's figures on held-out contexts (read back from ``out_dir/sae_evaluation.json`` when the SAE was
    reused and already evaluated); writes that file and the latent density plot, prints a table, returns them."""
    path = Path(job.out_dir) / "sae_evaluation.json"
    if reused and path.exists():
        figures = json.loads(path.read_text())
    else:
        evaluation = evaluate_sae(model, sae, job.hook_name, tokens=held_out_tokens(model, job))
        evaluation.plot_density(Path(job.out_dir) / "sae_latent_density.png")
        figures = evaluation.to_dict()
        path.write_text(json.dumps(figures, indent=1) + "\n")
    labels = {
        "l0": "L0 (active latents per token)",
        "fvu": "fraction of variance unexplained",
        "cosine": "cosine(x, x_hat)",
        "ce_clean": "CE loss clean",
        "ce_sae": "CE loss with the SAE spliced in",
        "ce_zero": "CE loss with the activation zeroed",
        "ce_recovered": "CE loss recovered",
        "kl": "KL(clean || spliced)",
        "dead_share": "dead latents",
        "dense_share": "dense latents",
    }
    rows = [[label, f"{figures[key]:.4g}"] for key, label in labels.items()]
    print(f"\nSAE at {job.hook_name} on {figures['n_tokens']} held-out tokens")
    print(format_table(["metric", "value"], rows, right=[1]))
    return figures


def run_main_job(job: MainJobConfig | None = None, model: HookedModel | None = None) -> dict:
    """Run ``job.stages`` in order (see the module docstring); returns what each stage returned, by stage name.

    ``model`` is an already-loaded model to use instead of loading ``job.model``. The wall time of each stage
    (and of loading the model, when the job does) goes to ``out_dir/timings.json`` (:func:`write_timings`).
    """
    job = job or MainJobConfig()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    if model is None:
        with _timed(timings, "load"):
            model = load_and_report(job.model)
    out = Path(job.out_dir)
    sae_path = job.sae_dir
    result: dict = {}
    if "look" in job.stages:
        print("\n== 1. A first look: next tokens, logit lens, continuation ==")
        with _timed(timings, "look"):
            result["look"] = run_first_look(job.model, job.prompt, out, job.top_k, job.max_new_tokens, model=model)
    if "sae" in job.stages:
        print(f"\n== 2. A TopK SAE on {job.hook_name} ==")
        with _timed(timings, "sae"):
            sae, reused = train_or_reuse_sae(model, job)
            print(f"{'Reused' if reused else 'Trained'} the SAE in {sae_path} (d_sae {sae.cfg.d_sae}, k {sae.cfg.k})")
            result["sae"] = evaluate_job_sae(model, sae, job, reused)
    if "dashboards" in job.stages:
        print("\n== 3. Latent dashboards: top examples, activation bins, histograms, logit effects ==")
        if not sae_path.exists():
            raise FileNotFoundError(f"no trained SAE in {sae_path}: run the 'sae' stage first")
        with _timed(timings, "dashboards"):
            dash = run_dashboards(job.dashboards, model=model)
        dead = int(dash.dead_latents().numel())
        print(
            f"Dashboards of {dash.d_sae} latents over {dash.n_tokens:,} tokens ({dead} dead): {job.dashboards.out_dir}"
        )
        result["dashboards"] = {"d_sae": dash.d_sae, "n_tokens": dash.n_tokens, "dead": dead}
    if "cooc" in job.stages:
        print("\n== 4. Latent co-occurrence: counts, graphs, subspace PCA ==")
        if not sae_path.exists():
            raise FileNotFoundError(f"no trained SAE in {sae_path}: run the 'sae' stage first")
        with _timed(timings, "cooc"):
            config_path = job.cooc.to_toml(out / "cooc.toml")
            print(f"Pipeline config: {config_path} (rerun it with: mechscope cooc run {config_path})")
            result["cooc"] = run_all(job.cooc, model=model)
        print(format_graph_summary(result["cooc"]["graphs"]))
    total = time.perf_counter() - start
    write_timings(out, timings, total)
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
    print(f"\nMain job done in {total:.0f} s ({stages}); everything is in {out.resolve()}")
    print(f"Open the explorer on it: mechscope app {out}   (or: bash run.sh app {out})")
    return result


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Set ``timings[stage]`` to the wall time in seconds of the ``with`` block."""
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start


def write_timings(out_dir: str | Path, stages: dict[str, float], total: float) -> Path:
    """Write ``out_dir/timings.json``: ``{"stages": {stage: seconds}, "total": seconds}``, the stages in the order
    they ran (``load``, loading the model, first when the job did) and ``total`` the whole job. Returns its path."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_json(Path(out_dir) / TIMINGS_FILE, {"stages": stages, "total": total})
