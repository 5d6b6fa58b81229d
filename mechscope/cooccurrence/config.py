"""The co-occurrence pipeline's configuration: ``CoocConfig`` and its ``[counting]``, ``[analysis]`` and ``[pca]``
tables, built in Python or read from a TOML file with :meth:`CoocConfig.from_toml`.

``[counting]`` (:class:`CountingConfig`) was ``[generation]`` (``GenerationConfig``), and two of its keys were
renamed (``model_name`` -> ``model``, ``sae_ids`` -> ``hook_names``); files and flags that use the old names are
still read, with a :class:`~mechscope.settings.DeprecatedSetting` warning naming the new ones.

The fields follow the ``sae_cooccurrence`` reference's config, plus what mechscope needs to stream activations
(``context_length``, ``batch_contexts``, ``device``, ``activations_dir``, ``text_field``, ``checkpoint_every``,
``checkpoint_seconds``) and ``results_dir``. Every error names the field as ``[table].field`` (and the file,
when read from one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from mechscope.settings import (
    Config,
    ConfigError,
    at_least,
    check_device,
    check_fields,
    check_hook_names,
    fail,
    label,
    meta,
)

__all__ = ["AnalysisConfig", "ConfigError", "CoocConfig", "CountingConfig", "GenerationConfig", "PCAConfig"]

EDGE_THRESHOLD_METHODS = ("exact", "bisection")
OUTPUT_FORMATS = ("mechscope", "sae_cooccurrence")


@dataclass
class CountingConfig(Config):
    """``[counting]``: what to count and over which tokens.

    ``sae`` is the path of an SAE (any format :func:`~mechscope.sae.load_sae` reads), or a table
    ``{hook name: path}`` when there are several; ``hook_names`` are the hooks to count at (default: the table's
    keys, or the SAE's own ``cfg.hook_name``). Counting reads ``n_batches`` batches of ``batch_size_tokens`` token
    rows (the kept positions of packed contexts).
    """

    LABEL: ClassVar[str] = "[counting]."

    model: str = field(metadata=meta("the model: short name, hub id, local dir or .gguf", old="model_name"))
    sae: str | dict[str, str] | None = field(
        default=None, metadata=meta("an SAE path, or a table {hook name = path} (required in a file)", required=True)
    )
    hook_names: list[str] | None = field(
        default=None,
        metadata=meta("hook names to count at; default: the table's keys, or the SAE's hook", old="sae_ids"),
    )
    corpus: str | None = field(
        default=None, metadata=meta("a .txt/.md file, a folder, a .jsonl file or hf:<id>; default: embedded")
    )
    text_field: str = field(default="text", metadata=meta("the document field of .jsonl and hf: corpora"))
    n_batches: int = field(default=100, metadata=meta("batches to count"))
    batch_size_tokens: int = field(default=4096, metadata=meta("token rows per batch"))
    activation_thresholds: list[float] = field(
        default_factory=lambda: [0.0],
        metadata=meta("latent i is active when its activation > t (+ its JumpReLU threshold)"),
    )
    remove_special_tokens: bool = field(default=True, metadata=meta("leave BOS/EOS/PAD positions out"))
    context_length: int = field(default=128, metadata=meta("tokens per packed context"))
    batch_contexts: int = field(default=8, metadata=meta("contexts per forward pass"))
    device: str = field(default="cpu", metadata=meta("device of the model and the SAEs"))
    activations_dir: str | None = field(
        default=None, metadata=meta("ActivationStore shards to read (and extend) instead of the model")
    )
    checkpoint_every: int = field(
        default=50, metadata=meta("batches between count checkpoints (0: not by batches); Ctrl-C writes one too")
    )
    checkpoint_seconds: float = field(
        default=300.0,
        metadata=meta(
            "seconds between count checkpoints, whichever of the two comes first (0: not by time); a checkpoint "
            "at a large d_sae takes seconds, so every batch would slow the count down"
        ),
    )
    allow_hook_mismatch: bool = field(
        default=False,
        metadata=meta("count an SAE at a hook other than the one its config says it was trained on (on purpose)"),
    )
    fold_decoder_norms: bool = field(
        default=True,
        metadata=meta(
            "scale each latent's activation (and JumpReLU threshold) by its decoder row's norm before thresholding, "
            "as sae_cooccurrence does (SAELens fold_W_dec_norm); false: threshold the raw activations"
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self.activation_thresholds = [float(t) for t in self.activation_thresholds]
        at_least(self, 1, "n_batches", "batch_size_tokens", "batch_contexts")
        at_least(self, 0, "checkpoint_every", "checkpoint_seconds")
        at_least(self, 2, "context_length")
        check_device(self, "device")
        if not self.model:
            raise fail(self, "model", "is empty: give a short name, hub id, local dir or .gguf")
        thresholds = self.activation_thresholds
        if not thresholds:
            raise fail(self, "activation_thresholds", "is empty: give at least one, e.g. [0.0]")
        bad = [t for t in thresholds if not (math.isfinite(t) and t >= 0)]
        if bad:
            raise fail(self, "activation_thresholds", f"must be finite and >= 0, got {bad}")
        if len(set(thresholds)) != len(thresholds):
            raise fail(self, "activation_thresholds", f"has duplicates: {thresholds}")
        if self.hook_names is not None:
            if not self.hook_names or len(set(self.hook_names)) != len(self.hook_names):
                raise fail(self, "hook_names", f"must be distinct hook names, got {self.hook_names}")
            check_hook_names(self, "hook_names")
            if isinstance(self.sae, dict):
                missing = [s for s in self.hook_names if s not in self.sae]
                if missing:
                    raise fail(
                        self,
                        "hook_names",
                        f"{missing} have no path in [counting.sae] (it has {list(self.sae)}): "
                        "add them to the table or drop them from hook_names",
                    )
            elif self.sae is not None and len(self.hook_names) > 1:
                raise fail(
                    self,
                    "sae",
                    f"is one path but hook_names lists {len(self.hook_names)} hooks: make sae a table "
                    "mapping each hook name to its SAE path ([counting.sae])",
                )
        if isinstance(self.sae, dict) and not self.sae:
            raise fail(self, "sae", "is an empty table: map each hook name to an SAE path")


GenerationConfig = CountingConfig  # its name before: [generation] meant "what to count"


@dataclass
class AnalysisConfig(Config):
    """``[analysis]``: the edge threshold's target subgraph sizes, what to write, and the seed of random choices."""

    LABEL: ClassVar[str] = "[analysis]."
    RETIRED: ClassVar[Mapping[str, str]] = {
        "min_subgraph_size_to_plot": "the static HTML pages are gone; `mechscope app` shows every subgraph",
        "skip_subgraph_plots": "the static HTML pages are gone; `mechscope app` shows every subgraph",
    }

    random_seed: int = field(default=42, metadata=meta("seeds the choice of PCA candidates"))
    min_subgraph_size: int = field(
        default=150, metadata=meta("the edge threshold aims for a largest subgraph of at least this size")
    )
    max_subgraph_size: int = field(default=200, metadata=meta("... and at most this size"))
    n_cooccurring: int = field(default=10, metadata=meta("most co-occurring latents kept per latent (dashboards)"))
    skip_subgraph_files: bool = field(default=False, metadata=meta("write no subgraph_objects/*.json"))
    include_metrics: bool = field(default=False, metadata=meta("graph metrics and structure scores in the node table"))
    edge_threshold_method: str = field(
        default="exact",
        metadata=meta(
            "exact: the smallest edge threshold whose largest subgraph has at most max_subgraph_size latents; "
            "bisection: sae_cooccurrence's binary search (find_threshold), to reproduce its published runs"
        ),
    )

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, 1, "min_subgraph_size", "max_subgraph_size", "n_cooccurring")
        if self.edge_threshold_method not in EDGE_THRESHOLD_METHODS:
            raise fail(
                self,
                "edge_threshold_method",
                f"must be one of {', '.join(EDGE_THRESHOLD_METHODS)}, got {self.edge_threshold_method!r}",
            )
        if self.min_subgraph_size > self.max_subgraph_size:
            raise ConfigError(
                f"{label(self, 'min_subgraph_size')}={self.min_subgraph_size} is larger than "
                f"{label(self, 'max_subgraph_size')}={self.max_subgraph_size}",
                field="min_subgraph_size",
            )


@dataclass
class PCAConfig(Config):
    """``[pca]``: which subgraphs get a PCA (``candidates_per_size`` of each size) and over how many tokens."""

    LABEL: ClassVar[str] = "[pca]."

    candidate_sizes: list[int] = field(
        default_factory=lambda: [3, 4, 5], metadata=meta("subgraph sizes to run the PCA on")
    )
    candidates_per_size: int = field(
        default=5,
        metadata=meta(
            "subgraphs per size, drawn with random_seed when there are more; 0: every subgraph of each size, "
            "as sae_cooccurrence's PCA script does"
        ),
    )
    n_batches_reconstruction: int = field(
        default=4, metadata=meta("batches of batch_size_tokens rows the PCA looks at (the first)")
    )
    max_examples: int = field(default=5000, metadata=meta("tokens per subgraph PCA"))

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, 0, "candidates_per_size")
        at_least(self, 1, "n_batches_reconstruction", "max_examples")
        if not self.candidate_sizes:
            raise fail(self, "candidate_sizes", "is empty: give the subgraph sizes to analyse, e.g. [3, 4, 5]")
        if min(self.candidate_sizes) < 2:
            raise fail(self, "candidate_sizes", f"must all be at least 2 latents, got {self.candidate_sizes}")


@dataclass
class CoocConfig(Config):
    """The whole pipeline: ``counting``, ``analysis`` and ``pca`` tables, and ``results_dir`` (top level).

    Read from a file with ``CoocConfig.from_toml(path)`` (or :func:`mechscope.settings.load`), written with
    ``to_toml(path)``; a file needs ``[counting]`` with ``model`` and ``sae``.
    """

    counting: CountingConfig = field(metadata=meta("what to count and over which tokens", old="generation"))
    analysis: AnalysisConfig = field(
        default_factory=AnalysisConfig, metadata=meta("the graphs: edge threshold, what to write")
    )
    pca: PCAConfig = field(default_factory=PCAConfig, metadata=meta("the subspace PCA of candidate subgraphs"))
    results_dir: str = field(
        default="cooc_results", metadata=meta("where everything is written (a folder per hook name inside)")
    )
    output_format: str = field(
        default="mechscope",
        metadata=meta(
            "mechscope: exact sparse matrices (mechscope_cooc_*.npz); sae_cooccurrence: the reference's dense "
            "float32 files (feature_acts_cooc_*.npz), edge_thresholds.csv and thresholded_matrices/ instead"
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.results_dir, str) or not self.results_dir:
            raise fail(self, "results_dir", f"must be a non-empty string, got {self.results_dir!r}")
        check_fields(self)
        if self.output_format not in OUTPUT_FORMATS:
            raise fail(self, "output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
