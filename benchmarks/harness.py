"""What a benchmark hands the runner, the round-robin timer, the persistent worker a peer in another venv runs, and
the peak-memory probe of a child process."""

from __future__ import annotations

import gc
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    and ``warmup`` are the benchmark's own round counts (a slow reference wants few). With ``measures="memory"``
    a contender's call is one measurement instead, returning ``{row label: bytes}`` (see
    :func:`measure_round_robin`), and the ratios name those rows.
    """

    description: str
    contenders: dict[str, Callable[[], object]]
    ratios: list[Ratio]
    notes: list[str] = field(default_factory=list)
    repeats: int = 150  # timed rounds unless --repeats says otherwise
    warmup: int = 2
    measures: Literal["time", "memory"] = "time"
    shuffle: bool = False  # a random order every round instead of a rotation (see time_round_robin)


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


@dataclass(frozen=True)
class Elapsed:
    """What a contender returns when it timed its own call: a worker in another process measures the call there,
    so the round trip through the pipe is not counted (it would dominate a call of a few hundred µs)."""

    seconds: float


def time_round_robin(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int, shuffle: bool = False
) -> dict[str, list[float]]:
    """Seconds per call of each contender over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Every round calls each contender once, starting one further along each time, so drifting machine load
    and call-order effects fall on all contenders alike. Rotating keeps each contender's predecessor, though; with
    ``shuffle`` every round takes a fresh (seeded) random order instead, for when one contender disturbs whichever
    call comes next (a worker in another process evicts this one's caches). A contender that returns an
    :class:`Elapsed` is credited with the time it reports instead of the wall time of the call.
    """

    def timed(label: str, fn: Callable[[], object]) -> dict[str, float]:
        start = time.perf_counter()
        result = fn()
        return {label: result.seconds if isinstance(result, Elapsed) else time.perf_counter() - start}

    return _round_robin(contenders, repeats, warmup, timed, shuffle)


def measure_round_robin(
    contenders: dict[str, Callable[[], dict[str, float]]], repeats: int, warmup: int, shuffle: bool = False
) -> dict[str, list[float]]:
    """The values each contender's call returns (``{row label: value}``, one measurement per call) over
    ``repeats`` rounds after ``warmup`` untimed ones, contenders in the rotated order of :func:`time_round_robin`."""
    return _round_robin(contenders, repeats, warmup, lambda _, fn: fn(), shuffle)


def _round_robin(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    measure: Callable[[str, Callable[[], object]], dict[str, float]],
    shuffle: bool,
) -> dict[str, list[float]]:
    calls = list(contenders.items())
    order = random.Random(0)
    values: dict[str, list[float]] = {}
    rows_of: dict[str, list[str]] = {label: [] for label in contenders}  # to list the rows in contender order
    for i in range(warmup + repeats):
        k = i % len(calls)
        for label, fn in order.sample(calls, len(calls)) if shuffle else calls[k:] + calls[:k]:
            rows = measure(label, fn)
            if i >= warmup:
                for row, value in rows.items():
                    if row not in values:
                        rows_of[label].append(row)
                    values.setdefault(row, []).append(value)
    return {row: values[row] for rows in rows_of.values() for row in rows}


def peak_rss(run: Callable[[], object]) -> tuple[int, int, object]:
    """``(baseline, peak, run())``: this process's resident set size in bytes just before ``run`` and its peak
    during ``run``. The kernel's high-water mark (``VmHWM``) is reset to the current size first, so what a model
    load allocated and freed before does not count; ``ru_maxrss`` cannot be reset that way (it also keeps the peak
    seen when any thread exited). Linux only (``/proc/self/clear_refs``, ``/proc/self/status``)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
    baseline = _status_bytes("VmRSS")
    result = run()
    return baseline, _status_bytes("VmHWM"), result


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no {field}")


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


def storage_bytes(tensors: list) -> int:
    """The bytes of the distinct storages behind ``tensors`` (torch tensors; one that two hook points share counts
    once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
