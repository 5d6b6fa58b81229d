"""What a benchmark hands the runner, the round-robin timer, and the persistent worker a peer in another venv runs."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Step = Callable[[], None]


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two contenders' median times; ``target`` is an upper bound, if any."""

    numerator: str
    denominator: str
    target: float | None = None


@dataclass
class Benchmark:
    """A benchmark, built and ready to time.

    ``contenders`` maps a label to a zero-argument call doing one timed unit of work; ``ratios`` are reported
    from their median times; ``notes`` are setup facts (shapes, sanity checks) shown with the results; ``repeats``
    and ``warmup`` are the benchmark's own round counts (a slow reference wants few).
    """

    description: str
    contenders: dict[str, Callable[[], object]]
    ratios: list[Ratio]
    notes: list[str] = field(default_factory=list)
    repeats: int = 150  # timed rounds unless --repeats says otherwise
    warmup: int = 2


@dataclass
class StageTimes:
    """A job with no peer to compare with, reported as a table of its stages' wall times.

    ``run`` does one round (the whole job) and returns the seconds of each stage, by label in the order they ran,
    and facts about what it computed (sanity checks, shown with the results: the last round's). ``notes`` are
    setup facts; ``repeats`` and ``warmup`` are its round counts (a job of minutes wants one and none).
    """

    description: str
    run: Callable[[], tuple[dict[str, float], list[str]]]
    notes: list[str] = field(default_factory=list)
    repeats: int = 1
    warmup: int = 0


def time_stages(
    run: Callable[[], tuple[dict[str, float], list[str]]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], list[str]]:
    """Each stage's seconds over ``repeats`` calls of ``run`` after ``warmup`` untimed ones, and the last call's
    facts."""
    times: dict[str, list[float]] = {}
    facts: list[str] = []
    for i in range(warmup + repeats):
        stages, facts = run()
        if i >= warmup:
            for label, seconds in stages.items():
                times.setdefault(label, []).append(seconds)
    return times, facts


def time_round_robin(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each contender over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Every round calls each contender once, starting one further along each time, so drifting machine load
    and call-order effects fall on all contenders alike.
    """
    calls = list(contenders.items())
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for i in range(warmup + repeats):
        k = i % len(calls)
        for label, fn in calls[k:] + calls[:k]:
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[label].append(elapsed)
    return times


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free ~95% confidence interval for it (order statistics)."""
    ordered, n = sorted(values), len(values)
    half_width = 0.98 * math.sqrt(n)  # 1.96 standard deviations of Binomial(n, 1/2), halved
    low = max(math.floor(n / 2 - half_width), 1)
    high = min(math.ceil(1 + n / 2 + half_width), n)
    return statistics.median(ordered), ordered[low - 1], ordered[high - 1]


def start_worker(python: Path, script: Path, spec: dict[str, Any], spec_file: Path, label: str) -> tuple[Step, dict]:
    """Start ``python script spec_file`` as a persistent worker (a peer in its own venv); return its step and the
    JSON line it printed when ready.

    ``spec`` is written to ``spec_file`` for the worker to read. Each call of the step sends ``step`` and waits for
    ``done``: only the worker's unit of work runs in between, so the round-robin can time it next to in-process
    contenders. The worker's stderr is this process's.
    """
    if not python.exists():
        raise FileNotFoundError(f"{python} is missing: `bash run.sh bench` creates the venv {python.parent.parent}")
    spec_file.write_text(json.dumps(spec))
    worker = subprocess.Popen(
        [str(python), str(script), str(spec_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    stdin, stdout = worker.stdin, worker.stdout
    first = stdout.readline()
    if not first:
        raise RuntimeError(f"the worker for {label} exited with {worker.wait()} before it was ready")

    def step() -> None:
        stdin.write("step\n")
        stdin.flush()
        if stdout.readline().strip() != "done":
            raise RuntimeError(f"the worker for {label} stopped (exit code {worker.poll()})")

    return step, json.loads(first)
