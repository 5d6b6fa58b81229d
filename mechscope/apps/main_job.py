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

Everything lands under ``out_dir``; the job prints where.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from mechscope.apps.first_look import DEFAULT_MODEL, DEFAULT_PROMPT, load_and_report, run_first_look
from mechscope.apps.tables import format_table
from mechscope.cooccurrence.config import AnalysisConfig, CoocConfig, GenerationConfig, PCAConfig
from mechscope.cooccurrence.pipeline import run_all
from mechscope.data.store import ActivationStore
from mechscope.models.hooked import HookedModel
from mechscope.sae.evaluate import evaluate_sae
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.train import CHECKPOINT_DIR, RESUMABLE_CHANGES, TrainConfig, train_sae
from mechscope.validation import matches, type_name

STAGES = ("look", "sae", "cooc")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class MainJobConfig:
    """Settings of the main job; the defaults are the SmolLM2-135M run documented in the README.
    ``mechscope demo`` has one flag per field (``--sae-tokens 65536`` ...).

    ``sae_tokens`` rows of ``hook_name`` are harvested once (``out_dir/activations``) and serve both the SAE's
    training and the co-occurrence count (``cooc_batches`` batches of ``cooc_batch_tokens`` rows, which must fit
    in them). ``eval_contexts`` contexts that follow the harvested ones are held out for the SAE's evaluation.
    """

    model: str = field(default=DEFAULT_MODEL, metadata=_help("short name, hub id, local dir or .gguf"))
    prompt: str = field(default=DEFAULT_PROMPT, metadata=_help("the prompt of the first look"))
    out_dir: str = field(default="demo_output", metadata=_help("where everything goes"))
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata=_help("stages to run: any of look, sae, cooc")
    )
    top_k: int = field(default=5, metadata=_help("look: how many next tokens to list"))
    max_new_tokens: int = field(default=10, metadata=_help("look: length of the greedy continuation"))
    hook_name: str = field(default="blocks.15.hook_resid_post", metadata=_help("sae: the hook point"))
    context_length: int = field(default=128, metadata=_help("tokens per corpus context"))
    sae_tokens: int = field(default=131072, metadata=_help("sae: tokens harvested and trained on"))
    expansion_factor: int = field(default=8, metadata=_help("sae: d_sae / d_model"))
    k: int = field(default=32, metadata=_help("sae: active latents per token"))
    batch_size: int = field(default=1024, metadata=_help("sae: tokens per training step"))
    lr: float = field(default=1e-3, metadata=_help("sae: Adam learning rate"))
    eval_contexts: int = field(default=32, metadata=_help("sae: held-out contexts for the evaluation"))
    activation_thresholds: list[float] = field(
        default_factory=lambda: [0.0, 10.0], metadata=_help("cooc: activity thresholds")
    )
    cooc_batches: int = field(default=32, metadata=_help("cooc: batches counted"))
    cooc_batch_tokens: int = field(default=4096, metadata=_help("cooc: tokens per batch"))
    min_subgraph_size: int = field(default=150, metadata=_help("cooc: target size of the largest subgraph, lower"))
    max_subgraph_size: int = field(default=200, metadata=_help("cooc: largest subgraph allowed"))
    candidate_sizes: list[int] = field(default_factory=lambda: [3, 4, 5], metadata=_help("cooc: PCA subgraph sizes"))
    candidates_per_size: int = field(default=2, metadata=_help("cooc: PCA subgraphs per size"))

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown main-job stage(s) {unknown}: choose from {', '.join(STAGES)}")
        for name, hint in typing.get_type_hints(MainJobConfig).items():
            value = getattr(self, name)
            if not matches(value, hint):
                raise ValueError(f"{name} must be {type_name(hint)}, got {value!r}")
            if hint is int and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.cooc_batches * self.cooc_batch_tokens > self.sae_tokens:
            raise ValueError(
                f"cooc_batches * cooc_batch_tokens = {self.cooc_batches * self.cooc_batch_tokens} exceeds the "
                f"{self.sae_tokens} harvested tokens (sae_tokens): lower one or raise sae_tokens"
            )
        self.train_config()  # the SAE's and the pipeline's own checks, now rather than after the training
        cooc_config(self, Path(self.out_dir) / "sae")

    def train_config(self) -> TrainConfig:
        """The SAE training run: a TopK SAE on ``hook_name`` over the harvested activations."""
        out = Path(self.out_dir)
        return TrainConfig(
            model=self.model,
            hook_name=self.hook_name,
            shard_dir=str(out / "activations"),
            context_length=self.context_length,
            n_tokens=self.sae_tokens,
            batch_size=self.batch_size,
            architecture="topk",
            expansion_factor=self.expansion_factor,
            k=self.k,
            lr=self.lr,
            warmup_steps=10,
            shuffle_buffer=min(32768, self.sae_tokens),
            dead_tokens_threshold=min(65536, self.sae_tokens // 2),
            out_dir=str(out / "sae_training"),
            log_every=16,
            checkpoint_every=32,
        )


def train_or_reuse_sae(model: HookedModel, job: MainJobConfig) -> tuple[SparseAutoencoder, bool]:
    """The job's SAE: loaded from ``out_dir/sae_training/sae`` when a finished run is there, else trained (resuming
    an interrupted run from its checkpoint). Returns ``(sae, reused)``."""
    config = job.train_config()
    final = Path(config.out_dir) / "sae"
    saved = Path(config.out_dir) / "train_config.json"
    if saved.exists():
        before, now = json.loads(saved.read_text()), dataclasses.asdict(config)
        diff = {k: (before.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and before.get(k) != v}
        if diff:
            raise ValueError(
                f"{config.out_dir} holds an SAE trained with other settings {diff} (there, now): "
                "use another out_dir, or the same settings"
            )
    if final.exists():
        return SparseAutoencoder.load(final), True
    config.resume = (Path(config.out_dir) / CHECKPOINT_DIR).exists()
    return train_sae(config, model=model), False


def held_out_tokens(model: HookedModel, job: MainJobConfig) -> torch.Tensor:
    """``[eval_contexts, context_length]``: the corpus contexts right after the harvested ones (never trained on)."""
    store = ActivationStore(model, job.hook_name, context_length=job.context_length)
    manifest = json.loads((Path(job.out_dir) / "activations" / "manifest.json").read_text())
    last = manifest["shards"][-1]
    contexts = list(islice(store.contexts(skip=last["first_context"] + last["n_contexts"]), job.eval_contexts))
    if not contexts:
        raise ValueError("the corpus has no contexts left after the harvested ones for the SAE's evaluation")
    return torch.stack(contexts)


def cooc_config(job: MainJobConfig, sae_path: Path) -> CoocConfig:
    """The co-occurrence pipeline over the first ``cooc_batches * cooc_batch_tokens`` harvested rows (absolute paths,
    so that the config written from it works from any directory)."""
    out = Path(job.out_dir).resolve()
    sae_path = Path(sae_path).resolve()
    return CoocConfig(
        generation=GenerationConfig(
            model_name=job.model,
            sae=str(sae_path),
            sae_ids=[job.hook_name],
            n_batches=job.cooc_batches,
            batch_size_tokens=job.cooc_batch_tokens,
            activation_thresholds=list(job.activation_thresholds),
            context_length=job.context_length,
            activations_dir=str(out / "activations"),
        ),
        analysis=AnalysisConfig(min_subgraph_size=job.min_subgraph_size, max_subgraph_size=job.max_subgraph_size),
        pca=PCAConfig(candidate_sizes=list(job.candidate_sizes), candidates_per_size=job.candidates_per_size),
        results_dir=str(out / "cooc"),
    )


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

    ``model`` is an already-loaded model to use instead of loading ``job.model``.
    """
    job = job or MainJobConfig()
    start = time.perf_counter()
    model = model if model is not None else load_and_report(job.model)
    out = Path(job.out_dir)
    sae_path = out / "sae_training" / "sae"
    result: dict = {}
    if "look" in job.stages:
        print("\n== 1. A first look: next tokens, logit lens, continuation ==")
        result["look"] = run_first_look(job.model, job.prompt, out, job.top_k, job.max_new_tokens, model=model)
    if "sae" in job.stages:
        print(f"\n== 2. A TopK SAE on {job.hook_name} ==")
        sae, reused = train_or_reuse_sae(model, job)
        print(f"{'Reused' if reused else 'Trained'} the SAE in {sae_path} (d_sae {sae.cfg.d_sae}, k {sae.cfg.k})")
        result["sae"] = evaluate_job_sae(model, sae, job, reused)
    if "cooc" in job.stages:
        print("\n== 3. Latent co-occurrence: counts, graphs, subspace PCA ==")
        if not sae_path.exists():
            raise FileNotFoundError(f"no trained SAE in {sae_path}: run the 'sae' stage first")
        config = cooc_config(job, sae_path)
        config_path = config.to_toml(out / "cooc.toml")
        print(f"Pipeline config: {config_path} (rerun it with: mechscope cooc run {config_path})")
        result["cooc"] = run_all(config, model=model)
    print(f"\nMain job done in {time.perf_counter() - start:.0f} s; everything is in {out.resolve()}")
    return result
