"""Stopping a long stage cleanly: SIGINT / SIGTERM become a flag the stage checks at safe points, and a cadence says
when a periodic checkpoint is due.

A long stage (training, a harvest, a count, dashboards) runs its loop inside :func:`stop_on_signals`. Ctrl-C or a
``kill`` then only sets the flag; the stage finishes the step it is in, writes its checkpoint and raises
:class:`Interrupted`, which says where the progress is and how to resume (the command line prints it as one line). A
second Ctrl-C while the checkpoint is written stops at once, as Ctrl-C does without this. The handlers in place
before are put back when the stage ends; outside the main thread (where Python cannot set handlers) nothing changes.
A signal that came after the stage's last check is delivered again once its handlers are restored, so it is never
lost (an enclosing stage, or Python's default, then acts on it).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stage stopped on SIGINT / SIGTERM after writing its checkpoint.

    ``stage``: what stopped (``"sae train"``); ``signum``: the signal; ``checkpoint``: where the progress is;
    ``where``: how far it got (``"step 12 of 100"``); ``resume``: the settings to change for a rerun to continue it
    (``{"resume": True}`` for training; empty when a rerun of the same settings continues by itself). A subclass of
    ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too and ``except Exception`` does not swallow it.
    """

    def __init__(
        self, stage: str, signum: int, checkpoint: str | Path, where: str, resume: Mapping[str, Any] | None = None
    ) -> None:
        self.stage, self.signum, self.checkpoint, self.where = stage, signum, Path(checkpoint), where
        self.resume = dict(resume or {})
        how = (
            "run it again with " + ", ".join(f"{k}={v!r}" for k, v in self.resume.items())
            if self.resume
            else "run it again with the same settings"
        )
        super().__init__(
            f"{stage} stopped by {signal.Signals(signum).name} at {where}; its progress is saved in {checkpoint}: "
            f"{how} to continue"
        )


class StopFlag:
    """Set when a stop signal arrived inside :func:`stop_on_signals`; true (``bool(flag)``) from then on."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.consumed = False

    def __bool__(self) -> bool:
        return self.signum is not None

    def interrupted(
        self, stage: str, checkpoint: str | Path, where: str, signum: int | None = None, **resume: Any
    ) -> Interrupted:
        """The :class:`Interrupted` to raise once the checkpoint is written (the signal is then handled). Under
        torchrun every rank stops when any rank got a signal: a rank whose own flag is not set passes the signal
        the ranks agreed on as ``signum``."""
        if self.signum is not None:
            self.consumed = True
            signum = self.signum
        assert signum is not None, "interrupted() is for a flag that is set, or with another rank's signum"
        return Interrupted(stage, signum, checkpoint, where, resume)


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Turn SIGINT / SIGTERM into a :class:`StopFlag` for the ``with`` block; see the module's docstring.

    A signal whose handler is ``SIG_IGN`` (a background job's SIGINT) stays ignored, and one whose handler was not
    set from Python is left alone. A second signal while the flag is set acts as the previous handler would (Ctrl-C:
    ``KeyboardInterrupt`` at once).
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous: dict[int, Any] = {int(s): signal.getsignal(s) for s in SIGNALS}
    mine = [s for s, handler in previous.items() if handler not in (signal.SIG_IGN, None)]

    def handle(signum: int, frame: FrameType | None) -> None:
        if flag:  # the second one: do what would have happened without us
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        flag.signum = signum

    for s in mine:
        signal.signal(s, handle)
    try:
        yield flag
    finally:
        for s in mine:
            signal.signal(s, previous[s])
        if flag and not flag.consumed and flag.signum in mine:
            signal.raise_signal(flag.signum)  # came after the last check: not lost


class Cadence:
    """Whether a periodic checkpoint is due: after ``every`` steps or ``seconds`` seconds since the last one,
    whichever comes first (0: never by that measure)."""

    def __init__(self, every: int = 0, seconds: float = 0.0) -> None:
        self.every, self.seconds = every, seconds
        self.steps, self.since = 0, time.monotonic()

    def __call__(self) -> bool:
        """Count one step; True (and start counting again) when a checkpoint is due."""
        self.steps += 1
        now = time.monotonic()
        due = (self.every > 0 and self.steps >= self.every) or (self.seconds > 0 and now - self.since >= self.seconds)
        if due:
            self.restart()
        return due

    def restart(self) -> None:
        """Count from now (a checkpoint was just written for another reason)."""
        self.steps, self.since = 0, time.monotonic()
