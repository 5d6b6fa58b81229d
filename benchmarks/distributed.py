"""Data-parallel throughput: the same unit of work in 2 processes (one torch thread each, gloo on CPU) against 1
process (one thread), for SAE training, co-occurrence counting and activation harvesting.

Each contender is a persistent worker (``distributed_side.py``): one process, or two ranks started with torchrun's
environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and joined by
``mechscope.distributed.session``, so that start-up and imports are not timed. One call sends the unit's name to
rank 0 and waits for ``done``, which rank 0 prints after a barrier: the time of the slowest rank, communication
included. Training: 4 steps of a TopK SAE (d_in 256, d_sae 4096, k 32, AuxK on) on batches of 4096 rows, each rank
computing its share (2048 rows) with the gradients and statistics summed over the ranks. Counting: 50 batches (the
count's `checkpoint_every`: the batches between two sums to rank 0) of 4096 tokens of TopK latents (d_sae 16384,
k 32), every other batch per rank, the sparse partial counts sent to rank 0 and summed there. Harvest: 2000 tokens
(16 contexts of 128, BOS not stored) of SmolLM2-135M at `blocks.15.hook_resid_post` into a fresh directory, in
forward passes of 4 contexts, one pass a shard: 4 shards, dealt 2 to each rank. The speed-up is 1 / ratio; the
issue's goal, a speed-up of at least 1.8, is a ratio <= 0.556.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import Benchmark, Ratio

SIDE = Path(__file__).resolve().with_name("distributed_side.py")
ROOT = Path(__file__).resolve().parent.parent
UNITS = ("train", "count", "harvest")
GOAL = 1 / 1.8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _workers(nproc: int) -> list[subprocess.Popen]:
    """``nproc`` ranks of ``distributed_side.py`` (a plain process when 1); rank 0's stdin and stdout are piped."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = str(_free_port())
    processes = []
    for rank in range(nproc):
        env = dict(base)
        if nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        pipes = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
        processes.append(
            subprocess.Popen([sys.executable, str(SIDE)], env=env, stdin=pipes, stdout=pipes, text=True, cwd=ROOT)
        )
    return processes


def _call(main: subprocess.Popen, unit: str) -> Callable[[], object]:
    def run() -> None:
        assert main.stdin is not None and main.stdout is not None
        main.stdin.write(unit + "\n")
        main.stdin.flush()
        answer = main.stdout.readline().strip()
        if not answer.startswith("done"):
            raise RuntimeError(f"the {unit} worker answered {answer!r}")

    return run


def setup() -> Benchmark:
    """Start one process and two ranks; each contender runs one unit in one of them."""
    one, two = _workers(1), _workers(2)
    contenders: dict[str, Callable[[], object]] = {}
    for unit in UNITS:
        contenders[f"{unit}, 1 process"] = _call(one[0], unit)
        contenders[f"{unit}, 2 processes"] = _call(two[0], unit)
    ratios = [Ratio(f"{unit}, 2 processes", f"{unit}, 1 process", target=GOAL) for unit in UNITS]
    return Benchmark(
        description=(__doc__ or "").split("\n\n", 1)[1].replace("\n", " ").strip(),
        contenders=contenders,
        ratios=ratios,
        notes=[f"{os.cpu_count()} cores; the processes stay up between rounds and end with the benchmark run."],
        repeats=10,
    )
