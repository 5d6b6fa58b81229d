"""``mechscope app``: start the explorer's Streamlit server on a results directory, offline, on localhost."""

from __future__ import annotations

import os
from pathlib import Path

from streamlit.web import cli as streamlit_cli

RESULTS_ENV = "MECHSCOPE_RESULTS_DIR"  # how the server learns its results directory
SCRIPT = Path(__file__).with_name("main.py")


def streamlit_args(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """``streamlit run``'s arguments: headless, no usage statistics, no file watcher, bound to ``host``."""
    return [
        "run", str(SCRIPT),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
    ]  # fmt: skip


def run_app(results_dir: str | Path = "demo_output", host: str = "127.0.0.1", port: int = 8501) -> int:
    """Serve the explorer over ``results_dir`` in this process until interrupted; returns the server's exit code.

    The server runs here rather than in a second Python (``streamlit run``), which would import streamlit and the
    explorer's modules again before the first page: a start takes seconds less.
    """
    root = Path(results_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: run `bash run.sh demo` first, or name a results directory")
    print(f"mechscope explorer on {root}: open http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    os.environ[RESULTS_ENV] = str(root)
    try:
        streamlit_cli.main(args=streamlit_args(host, port), prog_name="streamlit", standalone_mode=False)
    except KeyboardInterrupt:
        pass
    except SystemExit as e:  # streamlit ends its server with sys.exit(code)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0
