"""The ``mechscope`` commands that need the model stack: ``demo``, ``sae train``, ``cooc``, ``dashboards`` and
``export`` (see :mod:`mechscope.apps.cli`, which imports this module only when one of them runs or the full help is
shown: importing it imports torch and transformers, which ``mechscope app`` does not need)."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence

import mechscope.distributed as distributed
from mechscope.apps.main_job import MainJobConfig, run_main_job
from mechscope.apps.tables import format_graph_summary
from mechscope.cooccurrence import pipeline
from mechscope.cooccurrence.config import CoocConfig
from mechscope.dashboards.pipeline import DashboardsConfig, export_neuronpedia, run_dashboards
from mechscope.files import check_output_dir
from mechscope.sae.train import TrainConfig, train_sae
from mechscope.settings import DeprecatedSetting, add_flags, flag_values, load


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add every command but ``app`` to the subcommands ``commands``."""
    demo = commands.add_parser(
        "demo",
        help="the main job: a first look at the model, an SAE on its residual stream, latent co-occurrence",
        description="The end-to-end main job (SmolLM2-135M offline by default): top next tokens, a logit lens and "
        "a greedy continuation for one prompt; a TopK SAE trained (or reused) on a middle layer's residual stream and "
        "evaluated; then the SAE latent co-occurrence pipeline (counts, graphs, subspace PCA). "
        "Use --stages look to run only the first look. Settings come from MainJobConfig's defaults, then the TOML "
        "file given by --config (tables [train], [cooc.counting], ... for the nested configs), then the flags.",
    )
    demo.add_argument("--config", metavar="FILE", help="a TOML file of MainJobConfig settings")
    add_flags(demo, MainJobConfig)
    demo.set_defaults(run=_run_demo)
    sae = commands.add_parser("sae", help="sparse autoencoders", description="Sparse autoencoders.")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True, metavar="SAE_COMMAND")
    _add_train_parser(sae_commands)
    _add_cooc_parser(commands)
    _add_dashboards_parser(commands)
    _add_export_parser(commands)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    """``export neuronpedia RESULTS_DIR --out DIR``."""
    export = commands.add_parser("export", help="results in other tools' formats", description="Export results.")
    kinds = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    np_parser = kinds.add_parser(
        "neuronpedia",
        help="the dashboards as SAEDashboard batch files and Neuronpedia upload-batch bodies",
        description="Every dashboards folder under RESULTS_DIR in SAEDashboard's Neuronpedia format (batch-N.json, "
        "skipped_indexes.json) and as bodies for Neuronpedia's upload-batch route.",
    )
    np_parser.add_argument("results_dir", metavar="RESULTS_DIR")
    np_parser.add_argument("--out", required=True, metavar="DIR", help="where the export goes")
    np_parser.add_argument("--model-id", help="Neuronpedia model id (default: the model's name)")
    np_parser.add_argument("--sae-set", default="mechscope", help="Neuronpedia SAE set name (default mechscope)")
    np_parser.set_defaults(run=_run_export_neuronpedia)


def _run_export_neuronpedia(args: argparse.Namespace) -> None:
    check_output_dir(args.out, "--out")
    written = export_neuronpedia(args.results_dir, args.out, args.model_id, args.sae_set)
    print(f"Wrote {len(written)} files to {args.out}")


def _add_dashboards_parser(commands: argparse._SubParsersAction) -> None:
    """``dashboards CONFIG``: every latent's dashboard data (top examples, bins, histogram, logit effects)."""
    dash = commands.add_parser(
        "dashboards",
        help="feature dashboards of every latent of an SAE",
        description="Every latent's dashboard data, in three streaming passes over harvested activations "
        "(harvested first when missing). Settings come from DashboardsConfig's defaults, then the TOML file, then "
        "the flags.",
    )
    dash.add_argument("config", metavar="CONFIG", help="a TOML file of DashboardsConfig settings")
    _add_nproc_flag(dash)
    add_flags(dash, DashboardsConfig)
    dash.set_defaults(run=_run_dashboards)


def _run_dashboards(args: argparse.Namespace) -> None:
    config = load(DashboardsConfig, args.config, flag_values(args, DashboardsConfig))
    check_output_dir(config.out_dir, "out_dir")
    with distributed.session(config.device):
        dash = run_dashboards(config)
        distributed.print_main(f"Dashboards of {dash.d_sae} latents over {dash.n_tokens} tokens in {config.out_dir}")


COOC_STAGES = {
    "run": (pipeline.run_all, "all stages: count (resuming an interrupted count), graphs, PCA"),
    "count": (pipeline.run_count, "count latent co-occurrences (resumes from the results directory's checkpoint)"),
    "graphs": (
        pipeline.run_graphs,
        "Jaccard graphs, subgraphs, node tables, co-occurring latents and the summary, from the counts",
    ),
    "pca": (pipeline.run_pca, "the subspace PCA of candidate subgraphs, from the graphs"),
}


DATA_PARALLEL_COOC = ("run", "count")  # the stages that share their work among torchrun's processes
DATA_PARALLEL = ("sae train", "dashboards", *(f"cooc {stage}" for stage in DATA_PARALLEL_COOC))


def _add_nproc_flag(parser: argparse.ArgumentParser) -> None:
    """``--nproc N``: run the command under torchrun in N processes on this machine (docs/distributed.md)."""
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="run data-parallel in N processes on this machine (launches torchrun; see docs/distributed.md)",
    )


def _single_process(command: str) -> None:
    """Refuse to run ``command``, which does not share its work yet, in several torchrun processes."""
    if distributed.launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise ValueError(
            f"mechscope {command} does not run data-parallel yet: run it in one process (without torchrun); "
            f"the stages that do: {', '.join(DATA_PARALLEL)}"
        )


def launch_nproc(nproc: int, argv: Sequence[str]) -> int | None:
    """Relaunch the command line ``argv`` under torchrun in ``nproc`` processes (its ``--nproc`` removed) and return
    torchrun's exit status; None when there is nothing to launch (``--nproc 1``, or already under torchrun)."""
    if nproc == 1 or distributed.launched():
        return None
    return distributed.launch(nproc, _without_nproc(argv))


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` (or ``--nproc=N``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _add_cooc_parser(commands: argparse._SubParsersAction) -> None:
    """``cooc run|count|graphs|pca CONFIG``: the co-occurrence pipeline, or one of its stages, on a TOML config whose
    settings the flags override."""
    cooc = commands.add_parser(
        "cooc",
        help="SAE latent co-occurrence: counts, graphs, subspace PCA",
        description="The SAE latent co-occurrence pipeline, configured by a TOML file (see examples/cooc.toml).",
    )
    stages = cooc.add_subparsers(dest="cooc_command", required=True, metavar="STAGE")
    for name, (_, text) in COOC_STAGES.items():
        stage = stages.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        stage.add_argument("config", metavar="CONFIG", help="the pipeline's TOML file")
        if name in DATA_PARALLEL_COOC:
            _add_nproc_flag(stage)
        add_flags(stage, CoocConfig)
        stage.set_defaults(run=_run_cooc)


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """``sae train [CONFIG]``: a TOML file plus one flag per ``TrainConfig`` field (``hook_name`` ->
    ``--hook-name``); ``--config FILE``, its form before, still works with a warning."""
    train = commands.add_parser(
        "train",
        help="train an SAE on a model's activations",
        description="Train a sparse autoencoder. Settings come from TrainConfig's defaults, then the TOML file "
        "CONFIG (top-level keys named as the fields), then the flags.",
    )
    train.add_argument("config", nargs="?", metavar="CONFIG", help="a TOML file of TrainConfig fields (optional)")
    train.add_argument("--config", dest="config_flag", metavar="FILE", help=argparse.SUPPRESS)
    _add_nproc_flag(train)
    add_flags(train, TrainConfig)
    train.set_defaults(run=_run_train)


def _run_demo(args: argparse.Namespace) -> None:
    _single_process("demo")
    config = load(MainJobConfig, args.config, flag_values(args, MainJobConfig))
    check_output_dir(config.out_dir, "out_dir")
    run_main_job(config)


def _train_config_file(args: argparse.Namespace) -> str | None:
    """The TOML file of ``sae train``: CONFIG, or the deprecated ``--config FILE`` (with a warning)."""
    if args.config_flag is None:
        return args.config
    if args.config is not None:
        raise ValueError(f"two config files given ({args.config} and --config {args.config_flag}): give one, as CONFIG")
    warnings.warn(
        f"--config is deprecated: give the file as the first argument (mechscope sae train {args.config_flag})",
        DeprecatedSetting,
        stacklevel=2,
    )
    return args.config_flag


def _run_train(args: argparse.Namespace) -> None:
    """``sae train``: the TOML file's fields (if any), overridden by the flags given, then ``train_sae``."""
    config = load(TrainConfig, _train_config_file(args), flag_values(args, TrainConfig))
    check_output_dir(config.out_dir, "out_dir")
    if config.activations_dir is not None:
        check_output_dir(config.activations_dir, "activations_dir")
    with distributed.session(config.device):
        sae = train_sae(config)
        distributed.print_main(
            f"Saved {sae.cfg.architecture} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) to {config.out_dir}/sae"
        )


def _run_cooc(args: argparse.Namespace) -> None:
    """``cooc STAGE CONFIG``: read and check the config, run the stage, and print the graph summaries of the
    stages that build graphs (``graphs``, ``run``)."""
    stage = args.cooc_command
    run, _ = COOC_STAGES[stage]
    if stage not in DATA_PARALLEL_COOC:
        _single_process(f"cooc {stage}")
    config = load(CoocConfig, args.config, flag_values(args, CoocConfig))
    check_output_dir(config.results_dir, "results_dir")
    with distributed.session(config.counting.device):
        result = run(config)
        main_rank = distributed.is_main()
    if stage in ("graphs", "run") and main_rank:
        print(format_graph_summary(result if stage == "graphs" else result["graphs"]))
