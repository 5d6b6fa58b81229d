"""``mechscope app``: start the explorer's Streamlit server on a results directory, offline, on localhost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RESULTS_ENV = "MECHSCOPE_RESULTS_DIR"  # how the server learns its results directory
SCRIPT = Path(__file__).with_name("main.py")


def app_command(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The ``streamlit run`` command line: headless, no usage statistics, no file watcher, bound to ``host``."""
    return [
        sys.executable, "-m", "streamlit", "run", str(SCRIPT),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
    ]  # fmt: skip


def run_app(results_dir: str | Path = "demo_output", host: str = "127.0.0.1", port: int = 8501) -> int:
    """Serve the explorer over ``results_dir`` until interrupted; returns the server's exit code."""
    root = Path(results_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: run `bash run.sh demo` first, or name a results directory")
    print(f"mechscope explorer on {root}: open http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    env = {**os.environ, RESULTS_ENV: str(root)}
    try:
        return subprocess.call(app_command(host, port), env=env)
    except KeyboardInterrupt:
        return 0
