"""Launching :mod:`tests.distributed.job` under ``torchrun`` from a test, with a timeout: a test never hangs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("job.py")
TIMEOUT = 120  # seconds for a whole launch; a collective gives up after PG_TIMEOUT
PG_TIMEOUT = "60"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MECHSCOPE_DIST_TIMEOUT": PG_TIMEOUT,
        "HF_HUB_OFFLINE": "1",
    }


def torchrun_args(tasks: list[dict[str, Any]], tmp: Path, name: str) -> list[str]:
    """The worker part of a torchrun line: ``job.py TASKS`` (the tasks written to ``tmp/name.json``)."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(tasks))
    return [str(JOB), str(path)]


def torchrun(launch: list[str], tasks: list[dict[str, Any]], tmp: Path, name: str) -> subprocess.Popen:
    """Start ``torchrun LAUNCH job.py TASKS`` (not waiting); its output goes to ``tmp/name.log``."""
    command = [sys.executable, "-m", "torch.distributed.run", *launch, *torchrun_args(tasks, tmp, name)]
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait(process: subprocess.Popen, tmp: Path, name: str) -> int:
    """The exit status of ``process`` (killed after ``TIMEOUT`` seconds, which fails the test with its log)."""
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"torchrun {name} ran over {TIMEOUT} s:\n{(tmp / f'{name}.log').read_text()}") from None


def run_standalone(nproc: int, tasks: list[dict[str, Any]], tmp: Path, name: str) -> int:
    """Run the tasks in ``nproc`` processes on this machine; returns torchrun's exit status."""
    return wait(torchrun(["--standalone", f"--nproc-per-node={nproc}"], tasks, tmp, name), tmp, name)


def log(tmp: Path, name: str) -> str:
    return (tmp / f"{name}.log").read_text()
