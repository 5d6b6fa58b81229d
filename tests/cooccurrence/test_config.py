"""``CoocConfig``: reading TOML, defaults, and errors that name the file and the ``[table].field``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mechscope.cooccurrence.config import AnalysisConfig, ConfigError, CoocConfig, GenerationConfig, PCAConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cooc.toml"

FULL = """
results_dir = "out/cooc"

[generation]
model_name = "smollm2-135m"
sae_ids = ["blocks.3.hook_resid_post"]
corpus = "texts/"
n_batches = 7
batch_size_tokens = 512
activation_thresholds = [0, 1.5]
remove_special_tokens = false
context_length = 64
batch_contexts = 4
device = "cpu"
activations_dir = "shards"
text_field = "body"
checkpoint_every = 2

[generation.sae]
"blocks.3.hook_resid_post" = "saes/l3"
"blocks.5.hook_resid_post" = "saes/l5"

[analysis]
random_seed = 7
min_subgraph_size = 10
max_subgraph_size = 20
min_subgraph_size_to_plot = 3
skip_subgraph_plots = true
skip_subgraph_files = true
include_metrics = true

[pca]
candidate_sizes = [3, 4]
candidates_per_size = 2
n_batches_reconstruction = 1
max_examples = 100
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cooc.toml"
    path.write_text(text)
    return path


def test_every_field_is_read_from_toml(tmp_path: Path) -> None:
    config = CoocConfig.from_toml(_write(tmp_path, FULL))
    assert config == CoocConfig(
        GenerationConfig(
            model_name="smollm2-135m",
            sae={"blocks.3.hook_resid_post": "saes/l3", "blocks.5.hook_resid_post": "saes/l5"},
            sae_ids=["blocks.3.hook_resid_post"],
            corpus="texts/",
            text_field="body",
            n_batches=7,
            batch_size_tokens=512,
            activation_thresholds=[0.0, 1.5],
            remove_special_tokens=False,
            context_length=64,
            batch_contexts=4,
            device="cpu",
            activations_dir="shards",
            checkpoint_every=2,
        ),
        AnalysisConfig(7, 10, 20, 3, True, True, True),
        PCAConfig([3, 4], 2, 1, 100),
        results_dir="out/cooc",
    )
    assert all(isinstance(t, float) for t in config.generation.activation_thresholds)


def test_defaults(tmp_path: Path) -> None:
    config = CoocConfig.from_toml(_write(tmp_path, '[generation]\nmodel_name = "m"\nsae = "my_sae"\n'))
    gen, an, pca = config.generation, config.analysis, config.pca
    assert (gen.sae, gen.sae_ids, gen.corpus, gen.activations_dir) == ("my_sae", None, None, None)
    assert (gen.n_batches, gen.batch_size_tokens, gen.activation_thresholds) == (100, 4096, [0.0])
    assert (gen.remove_special_tokens, gen.context_length, gen.batch_contexts, gen.checkpoint_every) == (
        True,
        128,
        8,
        1,
    )
    assert (an.random_seed, an.min_subgraph_size, an.max_subgraph_size, an.min_subgraph_size_to_plot) == (
        42,
        150,
        200,
        4,
    )
    assert (an.skip_subgraph_plots, an.skip_subgraph_files, an.include_metrics) == (False, False, False)
    assert (pca.candidate_sizes, pca.candidates_per_size, pca.n_batches_reconstruction, pca.max_examples) == (
        [3, 4, 5],
        5,
        4,
        5000,
    )
    assert config.results_dir == "cooc_results"


def test_the_example_config_is_valid() -> None:
    config = CoocConfig.from_toml(EXAMPLE)
    assert config.generation.model_name == "smollm2-135m"
    assert config.generation.sae_ids == ["blocks.15.hook_resid_post"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("n_batches = 7", "n_batches = 0"), "[generation].n_batches must be at least 1, got 0"),
        (("n_batches = 7", 'n_batches = "7"'), "[generation].n_batches must be int, got '7'"),
        (("n_batches = 7", "n_batches = 7.0"), "[generation].n_batches must be int, got 7.0"),
        (("n_batches = 7", "n_batchs = 7"), "unknown key [generation].n_batchs in [generation]; did you mean "),
        (("[pca]", "[pcaa]"), "unknown key pcaa in top level; did you mean pca?"),
        (("include_metrics = true", "include_metrics = 1"), "[analysis].include_metrics must be bool, got 1"),
        (("[0, 1.5]", "[0, -1.5]"), "[generation].activation_thresholds must be finite and >= 0, got [-1.5]"),
        (("[0, 1.5]", "[]"), "[generation].activation_thresholds is empty"),
        (("[0, 1.5]", "[1.5, 1.5]"), "[generation].activation_thresholds has duplicates"),
        (("[0, 1.5]", "1.5"), "[generation].activation_thresholds must be list[float], got 1.5"),
        (("max_subgraph_size = 20", "max_subgraph_size = 5"), "[analysis].min_subgraph_size=10 is larger than"),
        (("candidate_sizes = [3, 4]", "candidate_sizes = [1, 4]"), "[pca].candidate_sizes must all be at least 2"),
        (("max_examples = 100", "max_examples = -1"), "[pca].max_examples must be at least 1, got -1"),
        (('"blocks.5.hook_resid_post" = "saes/l5"', '"blocks.5.hook_resid_post" = 5'), "[generation].sae must be"),
        (('sae_ids = ["blocks.3.hook_resid_post"]', 'sae_ids = ["blocks.4"]'), "[generation].sae_ids ['blocks.4']"),
        (("context_length = 64", "context_length = 1"), "[generation].context_length must be at least 2"),
        (('results_dir = "out/cooc"', "results_dir = 3"), "results_dir must be a non-empty string, got 3"),
        (('model_name = "smollm2-135m"', ""), "missing [generation].model_name"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in FULL
    path = _write(tmp_path, FULL.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        CoocConfig.from_toml(path)


def test_file_level_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, "[analysis]\nrandom_seed = 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: missing table [generation]")):
        CoocConfig.from_toml(path)
    path = _write(tmp_path, '[generation]\nmodel_name = "m"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: missing [generation].sae")):
        CoocConfig.from_toml(path)
    path = _write(tmp_path, 'analysis = 3\n[generation]\nmodel_name = "m"\nsae = "s"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [analysis] must be a table, got 3")):
        CoocConfig.from_toml(path)
    path = _write(tmp_path, "[generation\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid TOML")):
        CoocConfig.from_toml(path)
    with pytest.raises(FileNotFoundError):
        CoocConfig.from_toml(tmp_path / "absent.toml")


def test_python_construction_validates_too() -> None:
    gen = GenerationConfig("m", activation_thresholds=(0, 2), sae_ids=("blocks.0.hook_resid_post",))
    assert gen.activation_thresholds == [0.0, 2.0] and gen.sae_ids == ["blocks.0.hook_resid_post"]
    assert gen.sae is None  # in Python the SAE may be passed to the stages instead
    with pytest.raises(ConfigError, match=re.escape("[generation].sae is one path but sae_ids lists 2 hooks")):
        GenerationConfig("m", sae="s", sae_ids=["a", "b"])
    assert GenerationConfig("m", sae_ids=["a", "b"]).sae_ids == ["a", "b"]  # the SAEs come to the stages in Python
    with pytest.raises(ConfigError, match=re.escape("[generation].sae is an empty table")):
        GenerationConfig("m", sae={})
    with pytest.raises(ConfigError, match=re.escape("[analysis].random_seed must be int, got True")):
        AnalysisConfig(random_seed=True)
    with pytest.raises(ConfigError, match=re.escape("[pca] must be a PCAConfig, got dict")):
        CoocConfig(gen, pca={})
    assert isinstance(ConfigError("x"), ValueError)  # the CLI reports ValueErrors in one line


def test_to_toml_round_trips(tmp_path: Path) -> None:
    odd = 'dir "quoted" \\ back\tslash é 😀 \x7f'
    config = CoocConfig(
        GenerationConfig(
            "smollm2-135m",
            sae={"blocks.1.hook_resid_post": f"{odd}/a", "blocks.2.hook_resid_post": "b"},
            corpus=odd,
            activation_thresholds=[0.0, 1e-5, 12.5],
            remove_special_tokens=False,
        ),
        AnalysisConfig(include_metrics=True, min_subgraph_size=3),
        PCAConfig(candidate_sizes=[2, 7]),
        results_dir=odd,
    )
    path = config.to_toml(tmp_path / "c.toml")
    assert CoocConfig.from_toml(path) == config
    assert "[generation.sae]" in path.read_text(encoding="utf-8")
