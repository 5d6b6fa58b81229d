"""The ``mechscope`` command line: ``mechscope demo [--config job.toml] [--top-k 3 --train.k 16 ...]`` (the main
job), ``mechscope sae train [run.toml] [--FIELD VALUE ...]`` and ``mechscope cooc run|count|graphs|pca
CONFIG [--counting.n-batches 8 ...]``.

Every command reads its config the same way (:func:`mechscope.settings.load`): the config's defaults, then the TOML
file, then the flags, one per setting, with the setting's help as its ``--help`` text. Its output directory is
checked (:func:`mechscope.files.check_output_dir`) before any model loads. A failure ends with one line on
stderr (the error) and a hint to rerun with ``--debug``, which shows the traceback instead.

``sae train``, ``cooc run`` and ``cooc count`` run data-parallel under ``torchrun --nproc-per-node N -m mechscope
...``, or with ``--nproc N``, which launches that torchrun itself (:mod:`mechscope.distributed`,
docs/distributed.md); the other commands refuse to run in several processes.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import typing
from collections.abc import Sequence

from mechscope.apps.explorer.launch import run_app
from mechscope.interrupts import Interrupted

# Every command but ``app`` needs the model stack (torch and transformers: seconds to import). Their module is
# imported only when one of them runs or the full help is shown, so that ``mechscope app`` starts the explorer at
# once.
COMMANDS = "mechscope.apps.commands"


class Parser(argparse.ArgumentParser):
    """An argument parser (its subcommands' too) whose usage errors are one line naming ``--help``, not the whole
    usage (which for ``sae train`` lists some forty flags) before the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(app_only: bool = False) -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool; with ``app_only`` only ``app``, and nothing heavy imported."""
    parser = Parser(prog="mechscope", description="Mechanistic interpretability of language models.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (anywhere on the line)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if not app_only:
        importlib.import_module(COMMANDS).add_parsers(commands)
    _add_app_parser(commands)
    return parser


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
    and status 128 + the signal. ``--nproc N`` relaunches the command under torchrun (docs/distributed.md).
    ``--debug`` (anywhere on the line) lets the error propagate, with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    rest = [a for a in argv if a != "--debug"]
    parser = build_parser(app_only=rest[:1] == ["app"])
    args, unknown = parser.parse_known_args(rest)
    sub = next((getattr(args, a) for a in ("sae_command", "cooc_command", "export_command") if hasattr(args, a)), None)
    command = " ".join(filter(None, (args.command, sub)))
    if unknown:  # named under the command they were given to, not under the top-level parser
        parser.exit(
            2,
            f"mechscope {command}: error: unrecognized arguments: {' '.join(unknown)} "
            f"(see mechscope {command} --help)\n",
        )
    try:
        if getattr(args, "nproc", 1) != 1:
            launched = importlib.import_module(COMMANDS).launch_nproc(args.nproc, argv)
            if launched is not None:
                return launched
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
