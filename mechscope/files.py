"""Persistence, owned here: atomic file and directory writes, and the settings check before a resume.

Every file mechscope writes goes through :func:`atomic_write` (or :func:`atomic_write_text` /
:func:`atomic_write_json`), every directory that is replaced as a whole (checkpoints, model conversions)
through :func:`atomic_dir`, so an interruption never leaves a partial file or directory behind under the
final name. A job that resumes from saved state calls :func:`check_settings` first, so "refuse to resume
under other settings, and show what differs" is written once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


class SettingsMismatch(ValueError):
    """Saved state was written under other settings than the ones asked for now."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path`` (atomic on POSIX).

    If ``write`` raises, the temporary file is removed and ``path`` is left as it was. ``tmp`` keeps ``path``'s
    suffix, since some writers (``np.savez``) append theirs otherwise. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 1, **dumps_kwargs: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``json.dumps(data, indent=indent, **dumps_kwargs)``)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps_kwargs))


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def atomic_dir(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on an empty temporary directory next to ``path``, then put it in ``path``'s place.

    An existing ``path`` is first moved aside to ``.<name>.old`` and removed once the new one is in place; if the
    process dies between the two moves, :func:`recover_dir` (which this calls first) puts the set-aside state back,
    so a resume finds it. If ``write`` raises, the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    recover_dir(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        aside = _aside(path)
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def recover_dir(path: str | Path) -> Path | None:
    """Finish an :func:`atomic_dir` swap that a kill interrupted: if ``path`` is missing but its set-aside copy
    exists, move that back; if both exist, drop the set-aside copy. Returns ``path`` when it exists afterwards."""
    path = Path(path)
    aside = _aside(path)
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, path)
    return path if path.exists() else None


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (the writer of a temp file, before it is cleaned)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files and directories that :func:`atomic_write` or :func:`atomic_dir` of ``path`` left
    next to it when their process was killed mid-write (a process that no longer runs); returns what it removed.
    A job calls this when it starts, so a kill leaves no litter behind for long."""
    path = Path(path)
    pattern = re.compile(
        rf"\.(?:{re.escape(path.stem)}\.tmp(\d+){re.escape(path.suffix)}|{re.escape(path.name)}\.tmp(\d+))"
    )
    removed = []
    for candidate in path.parent.glob(".*.tmp*") if path.parent.is_dir() else []:
        match = pattern.fullmatch(candidate.name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or process_alive(pid):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def settings_diff(
    stored: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """``{name: (stored value, current value)}`` for every setting that differs, in ``stored``'s order, then the
    settings only ``current`` has; the names in ``ignore`` are left out."""
    skip = set(ignore)
    names = [*stored, *(k for k in current if k not in stored)]
    return {k: (stored.get(k), current.get(k)) for k in names if k not in skip and stored.get(k) != current.get(k)}


def check_settings(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    where: str | Path,
    what: str,
    fix: str,
    labels: str = "stored, now",
    ignore: Iterable[str] = (),
) -> None:
    """Raise :class:`SettingsMismatch` when ``stored`` and ``current`` differ outside ``ignore``.

    The message reads ``"{where} {what} with other settings {diff} ({labels}): {fix}"``, e.g. ``"out/ckpt was
    written by a run with other settings {'lr': (0.01, 0.02)} (checkpoint, now): resume with ..."``.
    """
    diff = settings_diff(stored, current, ignore)
    if diff:
        raise SettingsMismatch(f"{where} {what} with other settings {diff} ({labels}): {fix}")
