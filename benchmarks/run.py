"""Time mechscope side by side with its peers and regenerate docs/benchmarks.md.

    python benchmarks/run.py [--repeats N] [--only NAME | --update NAME...] [--no-write] [--threads N]

To add a benchmark, write a module whose function returns a :class:`harness.Benchmark` (contenders compared by
ratios) or a :class:`harness.StageTimes` (one job with no peer, by stage) and register it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import cache_memory
import cache_overhead
import cooccurrence
import counting_kernel
import distributed
import harvest
import hook_peers
import main_job
import sae_training
import torch
from harness import Benchmark, Ratio, StageTimes, measure_round_robin, median_interval, time_round_robin, time_stages

BENCHMARKS: dict[str, Callable[[], Benchmark | StageTimes]] = {
    "cache_memory": cache_memory.setup,
    "cache_overhead": cache_overhead.setup,
    "cooccurrence": cooccurrence.setup,
    "counting_kernel": counting_kernel.setup,
    "distributed": distributed.setup,
    "harvest": harvest.setup,
    "hook_fixed_cost": hook_peers.setup_fixed_cost,
    "hook_peers": hook_peers.setup,
    "main_job": main_job.setup,
    "sae_training": sae_training.setup,
}
PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
PACKAGES = ("mechscope", "torch", "transformers", "transformer_lens", "nnsight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per benchmark (default: each benchmark's own)"
    )
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark (implies --no-write)")
    parser.add_argument(
        "--update",
        nargs="+",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run these benchmarks and replace (or add) only their sections of {PAGE.name}",
    )
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {PAGE.name} alone")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see README.md)")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.only and args.update:
        parser.error("--only and --update exclude each other")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()

    sections = []
    for name in [args.only] if args.only else args.update or BENCHMARKS:
        print(f"{name}: setting up", file=sys.stderr)
        bench = BENCHMARKS[name]()
        repeats = args.repeats or bench.repeats
        print(f"{name}: {bench.warmup} warm-up + {repeats} measured rounds", file=sys.stderr)
        if isinstance(bench, StageTimes):
            stages, facts = time_stages(bench.run, repeats, bench.warmup)
            sections.append(report_stages(name, bench, stages, facts, repeats))
        else:
            measure = time_round_robin if bench.measures == "time" else measure_round_robin
            times = measure(bench.contenders, repeats, bench.warmup, bench.shuffle)
            sections.append(report(name, bench, times, repeats))
        print(sections[-1] + "\n")

    if args.only or args.no_write:
        return
    command = " ".join(["python benchmarks/run.py", *sys.argv[1:]])
    if args.update:
        PAGE.write_text(replace_sections(PAGE.read_text(), dict(zip(args.update, sections, strict=True))))
    else:
        PAGE.write_text(page(command, load, sections))
    print(f"wrote {PAGE}", file=sys.stderr)


def replace_sections(text: str, sections: dict[str, str]) -> str:
    """``text`` (the page) with the ``## name`` section of each of ``sections`` replaced, or appended if absent."""
    parts = text.split("\n## ")
    names = [part.split("\n", 1)[0] for part in parts]
    for name, section in sections.items():
        body = section.removeprefix("## ") + "\n"
        if name in names[1:]:
            parts[names.index(name, 1)] = body
        else:
            parts.append(body)
            names.append(name)
    return "\n## ".join(parts)


def report(name: str, bench: Benchmark, times: dict[str, list[float]], repeats: int) -> str:
    """A markdown section: what is measured, setup notes, times (or peak memory) per contender and the ratios."""
    median = {label: statistics.median(ts) for label, ts in times.items()}
    unit, scale = ("ms", 1e3) if bench.measures == "time" else ("MiB", 2**-20)
    kind = "timed" if bench.measures == "time" else "measurement"
    lines = _head(name, bench.description, bench.notes, f"{repeats} {kind}", bench.warmup)
    lines += [f"| contender | median ({unit}) | min ({unit}) | max ({unit}) |", "|---|---:|---:|---:|"]
    lines += [
        f"| {k} | {_figure(median[k] * scale)} | {_figure(min(ts) * scale)} | {_figure(max(ts) * scale)} |"
        for k, ts in times.items()
    ]
    lines += ["", "| ratio (median of per-round ratios) | value | 95% CI | target |", "|---|---:|---|---|"]
    for r in bench.ratios:
        ratios = [n / d for n, d in zip(times[r.numerator], times[r.denominator], strict=True)]
        value, low, high = median_interval(ratios)
        lines.append(
            f"| {r.numerator} / {r.denominator} | {value:.3f} | {low:.3f}–{high:.3f} | {_verdict(r, low, high)} |"
        )
    return "\n".join(lines)


def report_stages(name: str, bench: StageTimes, times: dict[str, list[float]], facts: list[str], repeats: int) -> str:
    """A markdown section: what is measured, setup notes and facts, and the seconds of each stage."""
    lines = _head(name, bench.description, [*bench.notes, *facts], f"{repeats} timed", bench.warmup)
    lines += ["| stage | median (s) | min (s) | max (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} |" for k, ts in times.items()]
    return "\n".join(lines)


def _head(name: str, description: str, notes: list[str], rounds: str, warmup: int) -> list[str]:
    """A section's title, description, notes and rounds line (with the time and load after them)."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    line = (
        f"- {rounds} rounds after {warmup} warm-up rounds; measured "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load average (1/5/15 min) after them: {load}."
    )
    return [f"## {name}", "", description, "", *(f"- {note}" for note in notes), line, ""]


def _figure(x: float) -> str:
    """A time or size to about three significant digits (a fixed-cost row is well under a millisecond)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _verdict(ratio: Ratio, low: float, high: float) -> str:
    if ratio.target is None:
        return ""
    verdict = "met" if high <= ratio.target else "missed" if low > ratio.target else "undecided (CI straddles it)"
    return f"≤ {ratio.target:.2f}: {verdict}"


def page(command: str, load: tuple[float, float, float], sections: list[str]) -> str:
    today = datetime.date.today().isoformat()
    header = [
        "# Benchmarks",
        "",
        f"Measured on {today} with `{command}`, from the repository root; a section re-measured since "
        "(`--update NAME`) gives its own time and load.",
        "",
        "Times are wall time per call: the median over timed rounds (each section says how many). Each round "
        "calls every contender once, starting one further along the list each time, so machine noise falls on "
        "all of them alike. A ratio is the median over rounds of the ratio of the two contenders' times in that "
        "round, so a burst of other load that slows one round cancels out; below 1 means the numerator is faster. "
        "The 95% confidence interval of that median comes from order statistics; a target counts as met or missed "
        "only when the whole interval is on one side of it.",
        "",
        "Machine:",
        "",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()} "
        "(one by default: other processes on the machine then disturb the timings far less)",
        f"- {platform.platform()}, Python {platform.python_version()}; load average (1/5/15 min) before the run: "
        + " / ".join(f"{x:.2f}" for x in load),
        "- " + ", ".join(f"{package} {version(package)}" for package in PACKAGES),
        "",
    ]
    return "\n".join(header + [section + "\n" for section in sections])


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
