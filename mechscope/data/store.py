"""ActivationStore: activations at hook points over a corpus, streamed live or kept in disk shards.

Contexts come from :func:`mechscope.data.corpus.pack_contexts` in a fixed order. Each forward pass runs
``batch_contexts`` of them and stops after the last block any requested hook needs. Rows are the kept
token positions (BOS/EOS/PAD excluded by default), in corpus order.

The store owns its disk format; consumers read it through :meth:`ActivationStore.chunks`,
:meth:`~ActivationStore.batches` and :meth:`~ActivationStore.resumable_batches`, never the files. In
``activations_dir`` a harvest writes ``shard_NNNNN.safetensors`` files — one ``[rows, d]`` tensor per hook
name plus ``tokens``, ``context`` and ``position`` ``[rows]`` — and ``manifest.json``, which records the
settings and, per shard, the contexts it covers. Shards and the manifest are written atomically
(:func:`mechscope.files.atomic_write`), so an interrupted harvest resumes at the first context no finished
shard covers: nothing is lost or stored twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import count, islice, repeat
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.data.corpus import iter_texts, pack_contexts
from mechscope.files import (
    DamagedFile,
    atomic_write,
    atomic_write_json,
    check_settings,
    clean_directory,
    read_json,
    read_safetensors,
    reading,
)
from mechscope.interrupts import Cadence, stop_on_signals
from mechscope.models.hooked import HookedModel
from mechscope.models.points import token_vectors
from mechscope.settings import DeprecatedSetting

MANIFEST = "manifest.json"
PENDING = "pending.safetensors"  # the rows of the shard being filled, saved by a stopped harvest
HARVEST_AGAIN = "delete {directory} to harvest again, or choose another activations_dir"
Rows = dict[str, Tensor]  # hook name -> [rows, d], and "tokens" / "context" / "position" -> [rows]
Position = tuple[int, int]  # where a batch starts: (key of a chunk, rows of it already served)
_RENAMED = {"source": "corpus", "shard_dir": "activations_dir"}  # keyword arguments it had before -> now


class ActivationStore:
    """Activations of ``hook_names`` over a corpus.

    ``corpus`` is a corpus source (see :func:`mechscope.data.corpus.iter_texts`; default: the embedded
    English prose). Rows are ``[d]`` vectors of one token position; batches are dicts hook name ->
    ``[batch, d]`` (plus ``"tokens"`` ``[batch]``). Per-head points (``attn.hook_z`` ...) are stored as one
    ``[n_heads * d_head]`` vector per token (:func:`~mechscope.models.points.token_vectors`), as SAEs read them.
    ``activations_dir``: where :meth:`harvest` writes its shards (``None``: live only). The keywords
    ``source=`` and ``shard_dir=`` still work, with a :class:`~mechscope.settings.DeprecatedSetting` warning.
    """

    def __init__(
        self,
        model: HookedModel,
        hook_names: str | list[str],
        corpus: str | Path | None = None,
        *,
        context_length: int = 128,
        batch_contexts: int = 8,
        exclude_special: bool = True,
        text_field: str = "text",
        dtype: torch.dtype = torch.float32,
        activations_dir: str | Path | None = None,
        shard_tokens: int = 65536,
        **old_names: Any,
    ):
        for old, value in old_names.items():
            if old not in _RENAMED:
                raise TypeError(f"ActivationStore() got an unexpected keyword argument {old!r}")
            new = _RENAMED[old]
            warnings.warn(f"ActivationStore({old}=...) is deprecated: use {new}=", DeprecatedSetting, stacklevel=2)
            if new == "corpus":
                corpus = value
            else:
                activations_dir = value
        self.model = model
        self.hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        for name in self.hook_names:
            model.points.resolve(name)  # unknown names fail here, with the closest valid ones
        self.corpus, self.text_field = corpus, text_field
        self.context_length, self.batch_contexts = context_length, batch_contexts
        self.exclude_special, self.dtype = exclude_special, dtype
        self.activations_dir = Path(activations_dir) if activations_dir is not None else None
        self.shard_tokens = shard_tokens
        self.stop_at_layer = model.stop_layer_for(self.hook_names)
        tok = model.tokenizer
        self._special = sorted({t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None})

    # ---- identity ------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What determines the stored rows; a shard directory is reused only for identical settings (the
        manifest's names: ``source`` is the corpus)."""
        return {
            "model": self.model.name,
            "model_fingerprint": self.model.fingerprint(),
            "family": self.model.cfg.family,
            "hook_names": self.hook_names,
            "source": "default" if self.corpus is None else str(self.corpus),
            "text_field": self.text_field,
            "context_length": self.context_length,
            "batch_contexts": self.batch_contexts,
            "exclude_special": self.exclude_special,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ---- live harvesting ----------------------------------------------------------------------------
    def contexts(self, skip: int = 0) -> Iterator[Tensor]:
        """Token contexts ``[context_length]`` in corpus order, from the ``skip``-th on."""
        packed = pack_contexts(iter_texts(self.corpus, self.text_field), self.model.tokenizer, self.context_length)
        return islice(packed, skip, None)

    def _run(self, tokens: Tensor, first_context: int) -> Rows:
        """Rows of one forward pass over ``tokens [n_contexts, context_length]``."""
        with torch.no_grad():
            _, cache = self.model.run_with_cache(tokens, names_filter=self.hook_names, stop_at_layer=self.stop_at_layer)
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.exclude_special and self._special:
            keep &= ~torch.isin(tokens, torch.tensor(self._special))
        n, p = tokens.shape
        context = torch.arange(first_context, first_context + n)[:, None].expand(n, p)
        position = torch.arange(p)[None].expand(n, p)
        rows = {name: token_vectors(cache[name], name).cpu()[keep].to(self.dtype) for name in self.hook_names}
        rows.update(tokens=tokens[keep], context=context[keep], position=position[keep])
        return rows

    def stream(
        self, n_tokens: int | None = None, skip_contexts: int = 0, progress: bool = True
    ) -> Iterator[tuple[int, int, Rows]]:
        """Yield ``(first_context, n_contexts, rows)`` per forward pass, in corpus order, until ``n_tokens`` rows."""
        done = 0
        bar = tqdm(total=n_tokens, unit="tok", desc="harvest", disable=not progress)
        contexts = self.contexts(skip_contexts)
        index = skip_contexts
        try:
            while n_tokens is None or done < n_tokens:
                batch = list(islice(contexts, self.batch_contexts))
                if not batch:
                    return
                rows = self._run(torch.stack(batch).to(self.model.device), index)
                yield index, len(batch), rows
                index += len(batch)
                done += len(rows["tokens"])
                bar.update(len(rows["tokens"]))
        finally:
            bar.close()

    # ---- disk shards --------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The shard directory's manifest, or None when nothing was harvested there yet; a directory harvested
        under other settings raises :class:`~mechscope.files.SettingsMismatch` naming them."""
        if self.activations_dir is None or not (self.activations_dir / MANIFEST).exists():
            return None
        path = self.activations_dir / MANIFEST
        manifest: dict[str, Any] = read_json(path, HARVEST_AGAIN.format(directory=self.activations_dir))
        if not isinstance(manifest, dict) or not {"settings", "shards"} <= manifest.keys():
            fix = HARVEST_AGAIN.format(directory=self.activations_dir)
            raise DamagedFile(f"{path} cannot be read (it lacks the settings or the shards): {fix}")
        check_settings(
            manifest["settings"],
            self.settings(),
            where=self.activations_dir,
            what="holds activations harvested",
            fix="use another activations_dir, or the same settings",
            labels="stored, requested",
        )
        return manifest

    def stored_tokens(self) -> int:
        """Rows the shards in ``activations_dir`` hold (0 when nothing was harvested)."""
        manifest = self.manifest()
        return sum(s["n_tokens"] for s in manifest["shards"]) if manifest else 0

    def harvested_contexts(self) -> int:
        """Contexts the shards cover: the first ``harvested_contexts()`` of the corpus (0 when nothing was
        harvested). A harvest continues at this context; ``contexts(skip=harvested_contexts())`` are unseen."""
        manifest = self.manifest()
        if not manifest or not manifest["shards"]:
            return 0
        last = manifest["shards"][-1]
        return int(last["first_context"] + last["n_contexts"])

    def harvest(
        self,
        n_tokens: int,
        progress: bool = True,
        *,
        on_batch: Callable[[int, int], object] | None = None,
        checkpoint_seconds: float = 300.0,
    ) -> int:
        """Harvest into ``activations_dir`` until it holds at least ``n_tokens`` rows (resuming what is there).

        Returns the rows stored. The corpus running out first is not an error; the count says so. Every
        ``checkpoint_seconds`` (0: never) the rows of the shard being filled are saved to ``pending.safetensors``,
        and on Ctrl-C / SIGTERM too, after the forward pass under way, before :class:`~mechscope.interrupts.
        Interrupted` is raised; the next harvest continues from them, so its shards equal an uninterrupted harvest's.
        ``on_batch(first_context, n_contexts)`` is called after every forward pass, before its rows are stored;
        an exception it raises stops the harvest as a kill would (rows in no finished shard or saved pending rows
        are lost, the finished shards and the manifest stay), so a test can check that the next harvest resumes
        exactly. Temporary files of killed harvests are removed when a harvest starts.
        """
        directory = self.activations_dir
        if directory is None:
            raise ValueError("harvest() writes shards: create the store with activations_dir=...")
        directory.mkdir(parents=True, exist_ok=True)
        clean_directory(directory)
        manifest = self.manifest() or {"version": 1, "settings": self.settings(), "shards": []}
        shards = manifest["shards"]
        stored = sum(s["n_tokens"] for s in shards)
        first = self.harvested_contexts()
        pending, n_contexts = self._pending(first)

        def flush() -> None:
            nonlocal first, stored, n_contexts
            merged = _cat(pending)
            name = f"shard_{len(shards):05d}.safetensors"
            atomic_write(directory / name, lambda tmp: save_file(merged, str(tmp)))
            n = len(merged["tokens"])
            shards.append({"file": name, "first_context": first, "n_contexts": n_contexts, "n_tokens": n})
            atomic_write_json(directory / MANIFEST, manifest)
            (directory / PENDING).unlink(missing_ok=True)
            stored += n
            first += n_contexts
            n_contexts = 0
            pending.clear()

        def save_pending() -> None:
            if not (directory / MANIFEST).exists():
                atomic_write_json(directory / MANIFEST, manifest)  # the settings the pending rows were harvested with
            pending[:] = [_cat(pending)]
            meta = {"first_context": str(first), "n_contexts": str(n_contexts)}
            atomic_write(directory / PENDING, lambda tmp: save_file(pending[0], str(tmp), metadata=meta))

        remaining = max(n_tokens - stored - _rows(pending), 0)
        due = Cadence(seconds=checkpoint_seconds)
        with stop_on_signals() as stop:  # Ctrl-C / SIGTERM: finish the pass, save the pending rows, raise
            for first_context, n_passed, rows in self.stream(
                remaining, skip_contexts=first + n_contexts, progress=progress and remaining > 0
            ):
                if on_batch is not None:
                    on_batch(first_context, n_passed)
                pending.append(rows)
                n_contexts += n_passed
                if _rows(pending) >= self.shard_tokens:
                    flush()
                elif due() or stop:
                    save_pending()
                if stop:
                    where = f"{stored + _rows(pending)} of {n_tokens} rows"
                    raise stop.interrupted("harvest", directory, where)
            if pending:
                flush()
        return stored

    def _pending(self, first_context: int) -> tuple[list[Rows], int]:
        """The rows a stopped harvest saved for the shard starting at context ``first_context`` and the contexts
        they cover (``([], 0)`` when there are none; a file left from before a finished shard is removed)."""
        assert self.activations_dir is not None
        path = self.activations_dir / PENDING
        if not path.exists():
            return [], 0
        with reading(path, "delete it (its rows are harvested again), or choose another activations_dir"):
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            start, n_contexts = int(meta["first_context"]), int(meta["n_contexts"])
        if start != first_context:  # a kill came after its shard was written, before it was removed
            path.unlink()
            return [], 0
        return [read_safetensors(path, fix="delete it (its rows are harvested again)")], n_contexts

    def _shards(self, start: int = 0, step: int = 1) -> Iterator[Rows]:
        """The stored shards from the ``start``-th on (every ``step``-th), one at a time, in corpus order."""
        manifest, directory = self.manifest(), self.activations_dir
        if directory is None or not manifest or not manifest["shards"]:
            raise FileNotFoundError(f"no harvested shards in {directory}; call harvest(n_tokens) first")
        for shard in manifest["shards"][start::step]:
            path = directory / shard["file"]
            if not path.exists():
                raise FileNotFoundError(f"shard {path} is missing: {HARVEST_AGAIN.format(directory=directory)}")
            yield read_safetensors(path, fix=HARVEST_AGAIN.format(directory=directory))

    def shard_rows(self) -> Iterator[Rows]:
        """The stored shards one at a time, in corpus order."""
        return self._shards()

    # ---- reading: chunks, and batches cut from them ---------------------------------------------------------
    def chunks(
        self, start: int = 0, n_tokens: int | None = None, progress: bool = False, *, step: int = 1
    ) -> Iterator[tuple[int, Rows]]:
        """The rows in corpus order, a chunk at a time, each with the key of the chunk after it.

        A chunk is a stored shard when ``activations_dir`` holds a harvest (shard ``i`` has key ``i + 1``), else a
        forward pass of ``batch_contexts`` contexts run live (nothing written). ``start`` is a key an earlier call
        yielded (0: the beginning). With ``n_tokens`` the chunks stop after the one that brings their rows to
        ``n_tokens``. ``progress`` shows a bar while harvesting live. ``step``: every ``step``-th shard from
        ``start`` on (a rank's share of a data-parallel read; stored shards only), each with the key after it.
        """
        if self.activations_dir is not None and self.stored_tokens() > 0:
            done = 0
            for index, rows in zip(count(start + 1, step), self._shards(start, step)):
                if n_tokens is not None and done >= n_tokens:
                    return
                yield index, rows
                done += len(rows["tokens"])
            return
        if step != 1:
            raise ValueError(f"chunks(step={step}) reads every {step}-th stored shard: harvest the activations first")
        for first, n_contexts, rows in self.stream(n_tokens, skip_contexts=start, progress=progress):
            yield first + n_contexts, rows

    def resumable_batches(self, batch_size_tokens: int, start: Position = (0, 0)) -> Iterator[tuple[Rows, Position]]:
        """Batches of ``batch_size_tokens`` rows in corpus order (``{hook: [batch, d], "tokens" / "context" /
        "position": [batch]}``) from ``start``, each with the ``start`` of the batch after it, to resume from
        (a JSON-able pair). The last batch may be smaller when the corpus (or the shards) run out."""
        key, skip = start
        return _rebatch(self.chunks(key), batch_size_tokens, (key, skip))

    def batches(
        self,
        batch_size_tokens: int,
        n_tokens: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        progress: bool = False,
    ) -> Iterator[Rows]:
        """Batches ``{hook_name: [batch_size_tokens, d], "tokens": [batch_size_tokens]}`` from the shards if
        harvested, else live.

        ``shuffle_buffer`` rows are mixed at a time (0: corpus order): the buffer fills, is permuted, and
        its first half is served while new rows refill it. At most ``n_tokens`` rows are served (whole
        batches: the last one may be smaller); rows are read up to the chunk that reaches ``n_tokens``.
        """
        keys = [*self.hook_names, "tokens"]
        rows: Iterator[Rows] = ({k: c[k] for k in keys} for _, c in self.chunks(0, n_tokens, progress))
        if shuffle_buffer:
            rows = _mix(rows, shuffle_buffer, torch.Generator().manual_seed(seed))
        served = 0
        for batch, _ in _rebatch(zip(repeat(0), rows), batch_size_tokens):  # shuffled rows have no position
            yield batch
            served += len(batch["tokens"])
            if n_tokens is not None and served >= n_tokens:
                return


def _n_rows(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def _rows(pieces: list[Rows]) -> int:
    """Rows in all ``pieces``."""
    return sum(len(p["tokens"]) for p in pieces)


def _cat(pieces: list[Rows]) -> Rows:
    """Rows pieces joined in order (a single piece as it is)."""
    if len(pieces) == 1:
        return pieces[0]
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def _mix(chunks: Iterator[Rows], buffer_rows: int, generator: torch.Generator) -> Iterator[Rows]:
    """Rows in shuffled order: fill a buffer of ``buffer_rows``, permute it, serve half, refill."""
    buffer: Rows | None = None
    for chunk in chunks:
        buffer = chunk if buffer is None else _cat([buffer, chunk])
        n = _n_rows(buffer)
        if n >= buffer_rows:
            order = torch.randperm(n, generator=generator)
            yield {k: v[order[: n // 2]] for k, v in buffer.items()}
            buffer = {k: v[order[n // 2 :]] for k, v in buffer.items()}
    if buffer is not None:
        order = torch.randperm(_n_rows(buffer), generator=generator)
        yield {k: v[order] for k, v in buffer.items()}


def _rebatch(
    chunks: Iterable[tuple[int, Rows]], batch_size: int, start: Position = (0, 0)
) -> Iterator[tuple[Rows, Position]]:
    """Chunks ``(key of the next chunk, rows)`` of any size re-cut into batches of ``batch_size`` rows (the last
    one may be smaller), each with the position of the batch after it. ``start``: the key of the first chunk and
    the rows of it to skip."""
    key, skip = start
    pending: list[Rows] = []
    n = 0
    for next_key, rows in chunks:
        size = _n_rows(rows)
        used, skip = skip, 0
        while used < size:
            take = min(batch_size - n, size - used)
            pending.append({k: v[used : used + take] for k, v in rows.items()})
            n, used = n + take, used + take
            if n == batch_size:
                yield _cat(pending), ((key, used) if used < size else (next_key, 0))
                pending, n = [], 0
        key = next_key
    if pending:
        yield _cat(pending), (key, 0)
