"""``CoocConfig``: reading TOML, defaults, and errors that name the file and the ``[table].field``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mechscope.cooccurrence.config import (
    AnalysisConfig,
    ConfigError,
    CoocConfig,
    CountingConfig,
    GenerationConfig,
    PCAConfig,
)
from mechscope.settings import DeprecatedSetting, add_flags, flag_values, load

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cooc.toml"

FULL = """
results_dir = "out/cooc"
output_format = "sae_cooccurrence"

[counting]
model = "smollm2-135m"
hook_names = ["blocks.3.hook_resid_post"]
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
fold_decoder_norms = false

[counting.sae]
"blocks.3.hook_resid_post" = "saes/l3"
"blocks.5.hook_resid_post" = "saes/l5"

[analysis]
random_seed = 7
min_subgraph_size = 10
max_subgraph_size = 20
n_cooccurring = 3
skip_subgraph_files = true
include_metrics = true
edge_threshold_method = "bisection"

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
        CountingConfig(
            model="smollm2-135m",
            sae={"blocks.3.hook_resid_post": "saes/l3", "blocks.5.hook_resid_post": "saes/l5"},
            hook_names=["blocks.3.hook_resid_post"],
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
            fold_decoder_norms=False,
        ),
        AnalysisConfig(7, 10, 20, 3, True, True, "bisection"),
        PCAConfig([3, 4], 2, 1, 100),
        results_dir="out/cooc",
        output_format="sae_cooccurrence",
    )
    assert all(isinstance(t, float) for t in config.counting.activation_thresholds)


def test_defaults(tmp_path: Path) -> None:
    config = CoocConfig.from_toml(_write(tmp_path, '[counting]\nmodel = "m"\nsae = "my_sae"\n'))
    gen, an, pca = config.counting, config.analysis, config.pca
    assert (gen.sae, gen.hook_names, gen.corpus, gen.activations_dir) == ("my_sae", None, None, None)
    assert (gen.n_batches, gen.batch_size_tokens, gen.activation_thresholds) == (100, 4096, [0.0])
    assert (gen.remove_special_tokens, gen.context_length, gen.batch_contexts) == (True, 128, 8)
    assert (gen.checkpoint_every, gen.checkpoint_seconds) == (50, 300.0)
    assert (an.random_seed, an.min_subgraph_size, an.max_subgraph_size, an.n_cooccurring) == (
        42,
        150,
        200,
        10,
    )
    assert (an.skip_subgraph_files, an.include_metrics, an.edge_threshold_method) == (False, False, "exact")
    assert gen.fold_decoder_norms is True  # as the reference: decoder norms folded into the activations
    assert (pca.candidate_sizes, pca.candidates_per_size, pca.n_batches_reconstruction, pca.max_examples) == (
        [3, 4, 5],
        5,
        4,
        5000,
    )
    assert (config.results_dir, config.output_format) == ("cooc_results", "mechscope")


def test_the_example_config_is_valid() -> None:
    config = CoocConfig.from_toml(EXAMPLE)
    assert config.counting.model == "smollm2-135m"
    assert config.counting.hook_names == ["blocks.15.hook_resid_post"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("n_batches = 7", "n_batches = 0"), "[counting].n_batches must be at least 1, got 0"),
        (("n_batches = 7", 'n_batches = "7"'), "[counting].n_batches must be int, got '7'"),
        (("n_batches = 7", "n_batches = 7.0"), "[counting].n_batches must be int, got 7.0"),
        (("n_batches = 7", "n_batchs = 7"), "unknown key [counting].n_batchs in [counting]; did you mean "),
        (("[pca]", "[pcaa]"), "unknown key pcaa in top level; did you mean pca?"),
        (("include_metrics = true", "include_metrics = 1"), "[analysis].include_metrics must be bool, got 1"),
        (("[0, 1.5]", "[0, -1.5]"), "[counting].activation_thresholds must be finite and >= 0, got [-1.5]"),
        (("[0, 1.5]", "[]"), "[counting].activation_thresholds is empty"),
        (("[0, 1.5]", "[1.5, 1.5]"), "[counting].activation_thresholds has duplicates"),
        (("[0, 1.5]", "1.5"), "[counting].activation_thresholds must be list[float], got 1.5"),
        (("max_subgraph_size = 20", "max_subgraph_size = 5"), "[analysis].min_subgraph_size=10 is larger than"),
        (("candidate_sizes = [3, 4]", "candidate_sizes = [1, 4]"), "[pca].candidate_sizes must all be at least 2"),
        (("max_examples = 100", "max_examples = -1"), "[pca].max_examples must be at least 1, got -1"),
        (("candidates_per_size = 2", "candidates_per_size = -1"), "[pca].candidates_per_size must be at least 0"),
        (
            ('edge_threshold_method = "bisection"', 'edge_threshold_method = "binary"'),
            "[analysis].edge_threshold_method must be one of exact, bisection, got 'binary'",
        ),
        (
            ('output_format = "sae_cooccurrence"', 'output_format = "dense"'),
            "output_format must be one of mechscope, sae_cooccurrence, got 'dense'",
        ),
        (("fold_decoder_norms = false", "fold_decoder_norms = 0"), "[counting].fold_decoder_norms must be bool"),
        (('"blocks.5.hook_resid_post" = "saes/l5"', '"blocks.5.hook_resid_post" = 5'), "[counting].sae must be"),
        (
            ('hook_names = ["blocks.3.hook_resid_post"]', 'hook_names = ["blocks.4"]'),
            "[counting].hook_names holds 'blocks.4', which is not a hook name",
        ),
        (  # a hook name without an SAE in [counting.sae]
            ('hook_names = ["blocks.3.hook_resid_post"]', 'hook_names = ["blocks.4.hook_resid_post"]'),
            "[counting].hook_names ['blocks.4.hook_resid_post']",
        ),
        (("context_length = 64", "context_length = 1"), "[counting].context_length must be at least 2"),
        (('results_dir = "out/cooc"', "results_dir = 3"), "results_dir must be a non-empty string, got 3"),
        (('model = "smollm2-135m"', ""), "missing [counting].model"),
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
    with pytest.raises(ConfigError, match=re.escape(f"{path}: missing table [counting]")):
        CoocConfig.from_toml(path)
    path = _write(tmp_path, '[counting]\nmodel = "m"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: missing [counting].sae")):
        CoocConfig.from_toml(path)
    path = _write(tmp_path, 'analysis = 3\n[counting]\nmodel = "m"\nsae = "s"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [analysis] must be a table, got 3")):
        CoocConfig.from_toml(path)
    path = _write(tmp_path, "[counting\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid TOML")):
        CoocConfig.from_toml(path)
    with pytest.raises(FileNotFoundError):
        CoocConfig.from_toml(tmp_path / "absent.toml")


def test_python_construction_validates_too() -> None:
    gen = CountingConfig("m", activation_thresholds=(0, 2), hook_names=("blocks.0.hook_resid_post",))
    assert gen.activation_thresholds == [0.0, 2.0] and gen.hook_names == ["blocks.0.hook_resid_post"]
    assert gen.sae is None  # in Python the SAE may be passed to the stages instead
    with pytest.raises(ConfigError, match=re.escape("[counting].sae is one path but hook_names lists 2 hooks")):
        CountingConfig("m", sae="s", hook_names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    both = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert CountingConfig("m", hook_names=both).hook_names == both  # the SAEs come to the stages in Python
    with pytest.raises(ConfigError, match=re.escape("[counting].sae is an empty table")):
        CountingConfig("m", sae={})
    with pytest.raises(ConfigError, match=re.escape("[analysis].random_seed must be int, got True")):
        AnalysisConfig(random_seed=True)
    with pytest.raises(ConfigError, match=re.escape("[pca] must be a PCAConfig, got dict")):
        CoocConfig(gen, pca={})
    assert isinstance(ConfigError("x"), ValueError)  # the CLI reports ValueErrors in one line


def test_to_toml_round_trips(tmp_path: Path) -> None:
    odd = 'dir "quoted" \\ back\tslash é 😀 \x7f'
    config = CoocConfig(
        CountingConfig(
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
    assert "[counting.sae]" in path.read_text(encoding="utf-8")


def test_the_old_names_are_still_read_with_a_warning_naming_the_new_ones(tmp_path: Path) -> None:
    """``[counting]`` was ``[generation]``, ``model`` was ``model_name``, ``hook_names`` were ``sae_ids``."""
    old = '[generation]\nmodel_name = "m"\nsae = "s"\nsae_ids = ["blocks.0.hook_resid_post"]\nn_batches = 3\n'
    path = _write(tmp_path, old)
    with pytest.warns(DeprecatedSetting) as caught:
        config = CoocConfig.from_toml(path)
    assert [str(w.message) for w in caught] == [
        f"{path}: [generation] is deprecated: use [counting]",
        f"{path}: [generation].model_name is deprecated: use [counting].model",
        f"{path}: [generation].sae_ids is deprecated: use [counting].hook_names",
    ]
    assert config == CoocConfig(CountingConfig("m", sae="s", hook_names=["blocks.0.hook_resid_post"], n_batches=3))
    assert GenerationConfig is CountingConfig  # the old name of the class still imports
    with pytest.warns(DeprecatedSetting) as caught:
        flagged = load(CoocConfig, path, {"generation.n_batches": 5})  # an override by its old name too
    assert "[generation] is deprecated: use [counting]" in [str(w.message) for w in caught]
    assert flagged.counting.n_batches == 5
    both = _write(tmp_path, old + '[counting]\nmodel = "m"\nsae = "s"\n')
    with pytest.raises(ConfigError, match=re.escape("both [generation] and [counting] are given: [generation] is the")):
        CoocConfig.from_toml(both)
    parser = argparse.ArgumentParser()
    add_flags(parser, CoocConfig)
    with pytest.warns(DeprecatedSetting, match="--generation.n-batches is deprecated: use --counting.n-batches"):
        args = parser.parse_args(["--generation.n-batches", "7"])
    assert flag_values(args, CoocConfig) == {"counting.n_batches": 7}


def test_retired_keys_are_read_without_effect_and_a_warning_saying_why(tmp_path: Path) -> None:
    """The static HTML pages' keys are gone with the pages; an old file still loads."""
    text = '[counting]\nmodel = "m"\nsae = "s"\n[analysis]\nmin_subgraph_size_to_plot = 3\nskip_subgraph_plots = true\n'
    with pytest.warns(DeprecatedSetting) as caught:
        config = CoocConfig.from_toml(_write(tmp_path, text))
    assert [str(w.message) for w in caught] == [
        f"[analysis].{key} is no longer used (the static HTML pages are gone; `mechscope app` shows every "
        "subgraph): remove it"
        for key in ("min_subgraph_size_to_plot", "skip_subgraph_plots")
    ]
    assert config == CoocConfig(CountingConfig("m", sae="s"))
