"""``mechscope.distributed`` in one process without ``torchrun``: no process group, rank 0 of 1, every item its
own, reductions return their input; the shares of N ranks; the backend by device; the torchrun command."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch

from mechscope import distributed


def test_without_torchrun_nothing_is_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session():
        assert not distributed.active() and not distributed.launched()
        assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
        assert distributed.is_main() and not distributed.quiet()
        x = torch.arange(3)
        assert distributed.all_reduce_sum(x) is x
        assert distributed.all_gather(x)[0] is x
        assert distributed.gather_to_main([1], lambda a, b: a + b) == [1]
        assert distributed.gather_tensors_to_main([x]) == [[x]]
        assert distributed.broadcast("x") == "x"
        assert list(distributed.share(5)) == [0, 1, 2, 3, 4] and distributed.owns(4)
        distributed.barrier()


@pytest.mark.parametrize(("n", "world"), [(0, 3), (7, 3), (2, 4), (9, 1)])
def test_shares_are_disjoint_and_cover_every_item(n: int, world: int) -> None:
    shares = [list(distributed.share(n, r, world)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert all(i % world == r for r, s in enumerate(shares) for i in s)
    with pytest.raises(ValueError, match="is not one of"):
        distributed.share(n, world, world)


def test_backend_by_device_and_its_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda:1") == "nccl"
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")
    assert distributed.backend_for("cuda") == "gloo"


def test_local_device_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device("cuda") == torch.device("cuda", 1)
    assert distributed.local_device("cuda:0") == torch.device("cuda", 0)
    assert distributed.local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout().total_seconds() == 12.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MECHSCOPE_DIST_TIMEOUT='soon' is not a number"):
        distributed.timeout()


def test_launch_command() -> None:
    command = distributed.launch_command(2, ["cooc", "count", "c.toml"])
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                       "mechscope", "cooc", "count", "c.toml"]  # fmt: skip
    with pytest.raises(ValueError, match="at least 1"):
        distributed.launch_command(0, [])


def test_launch_leaves_ctrl_c_to_torchrun_and_forwards_sigterm(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """While "torchrun" (here a stand-in that exits 7 on SIGTERM) runs, the launcher ignores SIGINT (torchrun gets
    Ctrl-C from the terminal itself) and passes SIGTERM on; then it returns the exit status, handlers restored."""
    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(distributed, "launch_command", lambda nproc, args: [sys.executable, "-c", child])

    def signal_launcher() -> None:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=signal_launcher)
    sender.start()
    assert distributed.launch(2, ["sae", "train"]) == 7
    sender.join()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
