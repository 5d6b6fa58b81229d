"""Persistence, owned here: atomic file and directory writes, and the settings check before a resume.

Every file mechscope writes goes through :func:`atomic_write` (or :func:`atomic_write_text` /
:func:`atomic_write_json`), every directory that is replaced as a whole (checkpoints, model conversions)
through :func:`atomic_dir`, so an interruption never leaves a partial file or directory behind under the
final name. A job that resumes from saved state calls :func:`check_settings` first, so "refuse to resume
under other settings, and show what differs" is written once. A job's start calls :func:`clean_directory` on its
output folder (temporary files of killed writers, interrupted swaps) after :func:`check_output_dir` refused one it
cannot write, and its checkpoints and stored state are read
with :func:`read_json`, :func:`read_npz` and :func:`read_safetensors`, which turn a damaged file into one
:class:`DamagedFile` error naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor


class SettingsMismatch(ValueError):
    """Saved state was written under other settings than the ones asked for now."""


class DamagedFile(ValueError):
    """A file mechscope wrote earlier cannot be read back (truncated, overwritten, not the format its name says)."""


DAMAGED_FIX = "delete it (a checkpoint: the job starts that part over), or choose another output directory"


def _reason(error: BaseException) -> str:
    """What is wrong with a file, from the error its reader raised (never numpy's advice to unpickle)."""
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {error.msg} at line {error.lineno}"
    if isinstance(error, UnicodeDecodeError):
        return "not text"
    if isinstance(error, (zipfile.BadZipFile, EOFError, zlib.error)):
        return "a truncated or damaged npz archive"
    if isinstance(error, SafetensorError):
        return f"a truncated or damaged safetensors file ({error})"
    if isinstance(error, ValueError) and ("pickle" in str(error) or "npz" in str(error)):
        return "not an npz archive"
    if isinstance(error, KeyError):
        return f"it lacks the entry {error}"
    return f"{type(error).__name__}: {error}"


@contextmanager
def reading(path: str | Path, fix: str = DAMAGED_FIX) -> Iterator[Path]:
    """Read ``path`` inside the ``with`` block (parse it too): any failure but a missing file is raised as one
    :class:`DamagedFile` naming ``path``, what is wrong and ``fix``. The readers below use it; so does a loader
    that checks what it parsed (a missing entry is a ``KeyError``: the file is damaged)."""
    path = Path(path)
    try:
        yield path
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, zlib.error, zipfile.BadZipFile, SafetensorError) as e:
        if isinstance(e, DamagedFile):
            raise
        raise DamagedFile(f"{path} cannot be read ({_reason(e)}): {fix}") from e


def read_json(path: str | Path, fix: str = DAMAGED_FIX) -> Any:
    """The JSON in ``path``; a damaged file raises :class:`DamagedFile` (``fix`` says what to do)."""
    with reading(path, fix):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def read_npz(path: str | Path, fix: str = DAMAGED_FIX) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path``, read at once (no pickled objects); a damaged file raises
    :class:`DamagedFile` (``fix`` says what to do)."""

    # the file is opened here, not by np.load, which leaves it open when a truncated archive fails to parse
    with reading(path, fix), open(path, "rb") as handle:
        data = np.load(handle, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an npz archive")
        with data:
            return {name: data[name] for name in data.files}


def read_safetensors(path: str | Path, device: str = "cpu", fix: str = DAMAGED_FIX) -> dict[str, Tensor]:
    """The tensors of the safetensors file ``path`` on ``device``; a damaged file raises :class:`DamagedFile`
    (``fix`` says what to do)."""
    with reading(path, fix):
        tensors: dict[str, Tensor] = load_file(str(path), device=device)
        return tensors


def check_output_dir(path: str | Path, setting: str) -> None:
    """Refuse the output directory ``path`` (named ``setting`` in messages) before any work: a file, a path under a
    file, or a directory in which no file can be made (permissions, a read-only file system). Nothing is created:
    the nearest existing folder on the way gets a probe file, removed at once."""
    path = Path(path)
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"is under the file {existing}"
            raise NotADirectoryError(f"{setting} {path} {where}, not a directory: choose another {setting}")
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".mechscope-write-check-")
    except NotADirectoryError:
        raise
    except OSError as e:
        raise PermissionError(
            f"{setting} {path} is not writable ({e.strerror} in {existing}): choose another {setting}, "
            "or make it writable"
        ) from None
    os.close(handle)
    os.unlink(probe)


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
        if _remove_if_dead(candidate, int(match.group(1) or match.group(2))):
            removed.append(candidate)
    return removed


_TEMP = re.compile(r"\.(?P<name>.+?)\.tmp(?P<pid>\d+)(?:\.[^.]+)?")


def _remove_if_dead(candidate: Path, pid: int) -> bool:
    """Remove the temporary ``candidate`` (a file or folder) when its writer ``pid`` no longer runs."""
    if pid == os.getpid() or process_alive(pid):
        return False
    if candidate.is_dir():
        shutil.rmtree(candidate, ignore_errors=True)
    else:
        candidate.unlink(missing_ok=True)
    return True


def clean_directory(directory: str | Path) -> list[Path]:
    """What killed runs left in ``directory``: remove every temporary file or folder of :func:`atomic_write` /
    :func:`atomic_dir` whose process no longer runs, and finish every interrupted swap (:func:`recover_dir`).
    Returns what it removed. A job calls this on its output folder when it starts."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for candidate in sorted(directory.glob(".*")):
        if candidate.name.endswith(".old"):
            recover_dir(directory / candidate.name[1:-4])
            continue
        match = _TEMP.fullmatch(candidate.name)
        if match is not None and _remove_if_dead(candidate, int(match["pid"])):
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
