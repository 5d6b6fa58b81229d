"""Data-parallel runs under ``torchrun``: the one module that talks to :mod:`torch.distributed`.

A stage asks this module who it is (:func:`rank`, :func:`world_size`, :func:`is_main`), which share of the work is
its own (:func:`share`, :func:`owns`, :func:`block`), and to combine what the ranks computed (:func:`all_reduce_sum`,
:func:`all_reduce_max`, :func:`sum_gradients_`, :func:`all_gather`, :func:`gather_to_main`,
:func:`gather_tensors_to_main`, :func:`combine_all`, :func:`broadcast`; in autograd, :func:`sum_over_ranks` and
:func:`sum_gradient_over_ranks`); it prints and shows progress bars on rank 0 only (:func:`print_main`,
:func:`quiet`). No stage imports :mod:`torch.distributed` itself.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) nothing changes: :func:`session` creates no
process group, the rank is 0 of 1, every item is this process's share and every reduction returns its input. Under
``torchrun`` (``torchrun --nproc-per-node N -m mechscope STAGE CONFIG``, or ``mechscope STAGE CONFIG --nproc N``,
which runs that command, see :func:`launch`) :func:`session` joins the process group: backend ``gloo`` on CPU and
``nccl`` on CUDA (``MECHSCOPE_DIST_BACKEND`` overrides it), each rank on ``cuda:LOCAL_RANK`` when on CUDA, and every
collective times out after ``MECHSCOPE_DIST_TIMEOUT`` seconds (default 1800) instead of hanging.

Python objects (dashboard states, small values) and the CPU tensors of :func:`gather_tensors_to_main` (the arrays of
sparse count matrices) always travel over a ``gloo`` group on CPU, also when the main group is NCCL, so they never
need a GPU copy.
"""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
BACKEND_ENV = "MECHSCOPE_DIST_BACKEND"
TIMEOUT_ENV = "MECHSCOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds
_objects_group: Any = None  # the gloo group Python objects travel over (the default group when that is gloo)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether a process group is up (:func:`session` under ``torchrun``, or one a caller initialised)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``), 0 without ``torchrun``."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Whether this is rank 0, the process that prints, shows progress and writes the shared files."""
    return rank() == 0


def quiet() -> bool:
    """True on every rank but 0: pass as ``tqdm(disable=...)`` so that only rank 0 shows a bar."""
    return not is_main()


def print_main(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        builtins.print(*args, **kwargs)


def backend_for(device: str | torch.device) -> str:
    """The backend for ``device``: ``MECHSCOPE_DIST_BACKEND`` if set, else ``nccl`` on CUDA and ``gloo`` otherwise."""
    override = os.environ.get(BACKEND_ENV)
    if override:
        return override
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: str | torch.device) -> torch.device:
    """``device`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK``; anything else stays as it is."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def timeout() -> timedelta:
    """How long a collective waits for the other ranks: ``MECHSCOPE_DIST_TIMEOUT`` seconds (default 1800)."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds: set it to e.g. 600") from None
    return timedelta(seconds=seconds)


@contextmanager
def session(device: str | torch.device = "cpu", backend: str | None = None) -> Iterator[None]:
    """Join the ``torchrun`` process group for the block, and leave it after (also on an error).

    Without ``torchrun``, or when a group is already up, it does nothing. ``backend`` overrides
    :func:`backend_for`; on CUDA each rank's current device becomes ``cuda:LOCAL_RANK``, so a bare ``cuda`` in a
    config means this rank's GPU.
    """
    global _objects_group
    if not launched() or active():
        yield
        return
    chosen = backend or backend_for(device)
    if chosen == "nccl":
        torch.cuda.set_device(local_device("cuda"))
    dist.init_process_group(chosen, timeout=timeout())
    _objects_group = None if chosen == "gloo" else dist.new_group(backend="gloo", timeout=timeout())
    try:
        yield
    finally:
        _objects_group = None
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if active():
        dist.barrier(group=_objects_group)


def share(n: int, of_rank: int | None = None, world: int | None = None) -> range:
    """The items of ``range(n)`` that are ``of_rank``'s (default this rank's) among ``world`` ranks: every
    ``world``-th one from ``of_rank`` on. The shares are disjoint, cover ``range(n)``, and depend only on
    ``(n, rank, world)``."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not one of {w} ranks")
    return range(r, n, w)


def block(n: int, of_rank: int | None = None, world: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that is ``of_rank``'s (default this rank's) among ``world`` ranks: the
    first ``n % world`` ranks hold ``n // world + 1`` items, the others ``n // world``, in rank order. The blocks
    are disjoint, cover ``range(n)``, and depend only on ``(n, rank, world)`` (a slice of a tensor, where
    :func:`share` deals items round-robin)."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not one of {w} ranks")
    size, extra = divmod(n, w)
    start = r * size + min(r, extra)
    return range(start, start + size + (r < extra))


def owns(index: int) -> bool:
    """Whether item ``index`` of a sequence dealt round-robin (:func:`share`) is this rank's."""
    return index % world_size() == rank()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor, on every rank; ``tensor`` itself without a
    process group). Integer tensors sum exactly."""
    if not active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """The element-wise maximum of ``tensor`` over all ranks (a new tensor, on every rank; ``tensor`` itself without
    a process group): "any rank" for flags, the smallest of all ranks as ``-all_reduce_max(-x)``."""
    if not active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


class _SumOverRanks(torch.autograd.Function):
    """Forward: the all-reduce sum; backward: the incoming gradient, unchanged (see :func:`sum_over_ranks`)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _SumGradientOverRanks(torch.autograd.Function):
    """Forward: the tensor itself; backward: the all-reduce sum of the gradient (see
    :func:`sum_gradient_over_ranks`)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks, whose gradient is the incoming gradient unchanged
    (``tensor`` itself without a process group).

    For a sum of the ranks' parts that every rank then turns into the same loss (the partial decodes of a
    latent-sharded SAE): each rank's part then gets the gradient of that one loss, which is the gradient of the
    sum. Every rank must call it, and the ranks' losses must be equal."""
    return _SumOverRanks.apply(tensor) if active() else tensor


def sum_gradient_over_ranks(tensor: Tensor) -> Tensor:
    """``tensor`` itself, whose gradient is summed over all ranks in the backward pass (``tensor`` itself, and its
    own gradient, without a process group).

    For a replicated tensor each rank uses in its own part of the computation (a latent-sharded SAE's ``b_dec`` in
    the encoder of its latents): its gradient is then the sum of every rank's part. Every rank's backward pass must
    reach it."""
    return _SumGradientOverRanks.apply(tensor) if active() else tensor


def sum_gradients_(params: Sequence[Tensor]) -> None:
    """Replace the gradient of each of ``params`` by its sum over all ranks, in place, in one all-reduce of one
    flat buffer (per dtype); a missing gradient counts as zeros. Nothing without a process group.

    The sum, not the mean: a stage whose loss on each rank is its share of the global batch's loss (a sum over its
    rows divided by the global batch size) gets the gradient of the global loss, whatever the shares' sizes."""
    if not active():
        return
    grads = []
    for p in params:
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        p.grad = grad
        grads.append(grad)
    for dtype in dict.fromkeys(g.dtype for g in grads):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.flatten() for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, piece in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(piece.view_as(g))


def all_gather(tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor``, in rank order, on every rank (``[tensor]`` without a process group). The tensors may
    differ in their first dimension."""
    if not active():
        return [tensor]
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return [piece[: int(s.item())] for piece, s in zip(pieces, sizes, strict=True)]


def gather_to_main(obj: T, combine: Callable[[T, T], T]) -> T | None:
    """On rank 0, every rank's ``obj`` folded in rank order with ``combine(left, right)``; None on the others.
    Without a process group, ``obj`` itself. The objects travel pickled over the CPU group, so rank 0 holds all
    of them at once, pickled and unpickled: use it for small values (large arrays go by :func:`gather_tensors_to_main`;
    a dense tensor is summed better by :func:`all_reduce_sum`)."""
    if not active():
        return obj
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0, group=_objects_group)
    if gathered is None:
        return None
    out: T = gathered[0]
    for other in gathered[1:]:
        out = combine(out, other)
    return out


def gather_tensors_to_main(tensors: Sequence[Tensor]) -> list[list[Tensor]] | None:
    """On rank 0, every rank's ``tensors`` in rank order (``[ranks][len(tensors)]``); None on the others. Without a
    process group, ``[list(tensors)]``.

    ``tensors`` are 1-D CPU tensors, as many and of the same dtypes on every rank, each of any length. Rank 0
    receives them point to point at their own lengths (their lengths first): it holds every rank's tensors once,
    with no padding to the longest and no pickled copy, and the other ranks send theirs in place. For large arrays
    (the CSR arrays of sparse counts); :func:`gather_to_main` is for small Python objects."""
    if not active():
        return [list(tensors)]
    lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.long)
    if not is_main():
        dist.send(lengths, dst=0, group=_objects_group)
        for t in tensors:
            if t.numel():
                dist.send(t.contiguous(), dst=0, group=_objects_group)
        return None
    gathered = [list(tensors)]
    for source in range(1, world_size()):
        theirs = torch.empty_like(lengths)
        dist.recv(theirs, src=source, group=_objects_group)
        received = [torch.empty(int(n), dtype=t.dtype) for n, t in zip(theirs, tensors, strict=True)]
        for t in received:
            if t.numel():
                dist.recv(t, src=source, group=_objects_group)
        gathered.append(received)
    return gathered


def combine_all(obj: T, combine: Callable[[T, T], T]) -> T:
    """Every rank's ``obj`` folded in rank order with ``combine`` (:func:`gather_to_main`), on every rank."""
    folded = gather_to_main(obj, combine)
    return broadcast(folded if folded is not None else obj)  # the others' ``obj`` is a placeholder rank 0 replaces


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_objects_group)
    return box[0]


def launch_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The ``torchrun`` command that runs ``python -m mechscope ARGS`` in ``nproc`` processes on this machine."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give at least 1 process")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
            "mechscope", *args]  # fmt: skip


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``mechscope ARGS`` under ``torchrun`` in ``nproc`` processes (:func:`launch_command`); returns its exit
    status (torchrun ends every rank when one fails).

    A stop signal is left to torchrun, which passes it on once to every rank (they run in sessions of their own),
    so that the stage stops cleanly after its checkpoint: while torchrun runs, this process ignores SIGINT (Ctrl-C
    reaches torchrun too, from the terminal) and forwards SIGTERM to it, then returns torchrun's exit status."""
    process = subprocess.Popen(launch_command(nproc, args))
    if threading.current_thread() is not threading.main_thread():
        return process.wait()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
