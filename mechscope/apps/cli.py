"""The ``mechscope`` command line: ``mechscope demo [--config job.toml] [--top-k 3 --train.k 16 ...]`` (the main
job), ``mechscope sae train [run.toml] [--FIELD VALUE ...]`` and ``mechscope cooc run|count|graphs|pca
CONFIG [--counting.n-batches 8 ...]``.

Every command reads its config the same way (:func:`mechscope.settings.load`): the config's defaults, then the TOML
file, then the flags, one per setting, with the setting's help as its ``--help`` text. Its output directory is
checked (:func:`check_output_dir`) before any model loads. A failure ends with one line on stderr (the error) and a
hint to rerun with ``--debug``, which shows the traceback instead.

``cooc run`` and ``cooc count`` run data-parallel under ``torchrun --nproc-per-node N -m mechscope ...``, or with
``--nproc N``, which launches that torchrun itself (:mod:`mechscope.distributed`, docs/distributed.md); the other
commands refuse to run in several processes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import mechscope.distributed as distributed
from mechscope.apps.explorer.launch import run_app
from mechscope.apps.main_job import MainJobConfig, run_main_job
from mechscope.apps.tables import format_graph_summary
from mechscope.cooccurrence import pipeline
from mechscope.cooccurrence.config import CoocConfig
from mechscope.dashboards.pipeline import DashboardsConfig, export_neuronpedia, run_dashboards
from mechscope.interrupts import Interrupted
from mechscope.sae.train import TrainConfig, train_sae
from mechscope.settings import DeprecatedSetting, add_flags, flag_values, load


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool."""
    parser = argparse.ArgumentParser(prog="mechscope", description="Mechanistic interpretability of language models.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (anywhere on the line)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    _add_app_parser(commands)
    _add_export_parser(commands)
    return parser


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
    add_flags(dash, DashboardsConfig)
    dash.set_defaults(run=_run_dashboards)


def _run_dashboards(args: argparse.Namespace) -> None:
    _single_process("dashboards")
    config = load(DashboardsConfig, args.config, flag_values(args, DashboardsConfig))
    check_output_dir(config.out_dir, "out_dir")
    dash = run_dashboards(config)
    print(f"Dashboards of {dash.d_sae} latents over {dash.n_tokens} tokens in {config.out_dir}")


def _add_app_parser(commands: argparse._SubParsersAction) -> None:
    """``app [RESULTS_DIR]``: the explorer on localhost."""
    app = commands.add_parser(
        "app",
        help="the explorer web app over a results directory",
        description="Serve the explorer (latent dashboards, prompt inspector) over a results directory, offline.",
    )
    app.add_argument("results_dir", nargs="?", default="demo_output", help="default: demo_output")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost only)")
    app.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    app.set_defaults(run=lambda args: run_app(args.results_dir, args.host, args.port))


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
            f"the stages that do: cooc {', '.join(DATA_PARALLEL_COOC)}"
        )


def _without_nproc(argv: list[str]) -> list[str]:
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
    add_flags(train, TrainConfig)
    train.set_defaults(run=_run_train)


def _run_demo(args: argparse.Namespace) -> None:
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
    _single_process("sae train")
    config = load(TrainConfig, _train_config_file(args), flag_values(args, TrainConfig))
    check_output_dir(config.out_dir, "out_dir")
    if config.activations_dir is not None:
        check_output_dir(config.activations_dir, "activations_dir")
    sae = train_sae(config)
    print(f"Saved {sae.cfg.architecture} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) to {config.out_dir}/sae")


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


def check_output_dir(path: str | Path, setting: str) -> None:
    """Refuse the output directory ``path`` (named ``setting`` in messages) before any work: a file, a path under a
    file, or a directory in which no file can be made (permissions, a read-only file system). Nothing is created:
    the nearest existing folder on the way gets a probe file, removed at once."""
    path = Path(path)
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"is under the file {existing}"
            raise NotADirectoryError(f"{setting} {path} {where}, not a directory: choose another {setting}")
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".mechscope-write-check-")
    except NotADirectoryError:
        raise
    except OSError as e:
        raise PermissionError(
            f"{setting} {path} is not writable ({e.strerror} in {existing}): choose another {setting}, "
            "or make it writable"
        ) from None
    os.close(handle)
    os.unlink(probe)


def error_line(error: BaseException) -> str:
    """``error`` as one line for the user: its message (a ``KeyError``'s without the quotes ``str`` adds), prefixed
    by its type unless that is one of the expected kinds (bad settings, files, missing keys)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        message = error.args[0].strip()
    else:
        message = str(error).strip()
    if not message:
        return type(error).__name__
    if isinstance(error, (OSError, ValueError, KeyError)):
        return message
    return f"{type(error).__name__}: {message}"


def resume_command(argv: Sequence[str], interrupted: Interrupted) -> str:
    """The command line that continues an interrupted run: ``argv`` again, plus a flag per setting the rerun must
    change (``--resume`` for ``sae train``)."""
    flags = [f"--{name.replace('_', '-')}" for name, value in interrupted.resume.items() if value is True]
    return shlex.join(["mechscope", *argv, *(f for f in flags if f not in argv)])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Any error (a model that cannot be loaded, an unwritable output directory, a bad setting, a bug) ends with
    ``mechscope COMMAND: error: MESSAGE`` and a hint on stderr and status 1, not a traceback; Ctrl-C ends with status
    130; a long stage stopped by Ctrl-C / SIGTERM writes its checkpoint and ends with one line saying how to resume
    and status 128 + the signal. ``--debug`` (anywhere on the line) lets the error propagate, with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    sub = next((getattr(args, a) for a in ("sae_command", "cooc_command", "export_command") if hasattr(args, a)), None)
    command = " ".join(filter(None, (args.command, sub)))
    try:
        if getattr(args, "nproc", 1) != 1 and not distributed.launched():
            return distributed.launch(args.nproc, _without_nproc(argv))
        args.run(args)
    except Interrupted as e:
        if debug:
            raise
        print(f"mechscope {command}: {e} (checkpoint written); resume: {resume_command(argv, e)}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mechscope {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"mechscope {command}: error: {error_line(e)}", file=sys.stderr)
        print("(rerun with --debug to see the traceback)", file=sys.stderr)
        return 1
    return 0
