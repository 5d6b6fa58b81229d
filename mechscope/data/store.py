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
shard covers: nothing is lost or stored twice. A harvest plans its shards from the tokens first
(:meth:`ActivationStore.plan`), so ranks under torchrun can share it (``harvest(..., data_parallel=True)``) and
write the very shards and manifest one process writes (docs/distributed.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from itertools import count, islice, repeat
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

import mechscope.distributed as distributed
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
from mechscope.interrupts import Cadence, StopFlag, stop_on_signals
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
        self._fixed_settings: dict[str, Any] | None = None  # while a harvest runs (_settings_fixed)

    # ---- identity ------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What determines the stored rows; a shard directory is reused only for identical settings (the
        manifest's names: ``source`` is the corpus)."""
        if self._fixed_settings is not None:
            return self._fixed_settings
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

    @contextmanager
    def _settings_fixed(self) -> Iterator[None]:
        """:meth:`settings` computed once for the block (the model's fingerprint samples every weight): for one
        harvest, during which the model does not change."""
        self._fixed_settings = self.settings()
        try:
            yield
        finally:
            self._fixed_settings = None

    # ---- live harvesting ----------------------------------------------------------------------------
    def contexts(self, skip: int = 0) -> Iterator[Tensor]:
        """Token contexts ``[context_length]`` in corpus order, from the ``skip``-th on."""
        packed = pack_contexts(iter_texts(self.corpus, self.text_field), self.model.tokenizer, self.context_length)
        return islice(packed, skip, None)

    def _kept(self, tokens: Tensor) -> Tensor:
        """``[n_contexts, context_length]`` bool: the positions of ``tokens`` that become rows."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.exclude_special and self._special:
            keep &= ~torch.isin(tokens, torch.tensor(self._special, device=tokens.device))
        return keep

    def _run(self, tokens: Tensor, first_context: int) -> Rows:
        """Rows of one forward pass over ``tokens [n_contexts, context_length]``."""
        with torch.no_grad():
            _, cache = self.model.run_with_cache(tokens, names_filter=self.hook_names, stop_at_layer=self.stop_at_layer)
        keep = self._kept(tokens).to(tokens.device)
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
        data_parallel: bool = False,
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

        The shards are planned before any forward pass (:meth:`plan`: the contexts and rows of each, from the
        tokens alone), so a harvest can be shared. With ``data_parallel`` under torchrun every rank calls this:
        the planned shards not yet written are dealt round-robin, each rank writes its own (the files one process
        writes) and records them in ``manifest.rank{R}.json``, and rank 0 merges them into ``manifest.json`` once
        all are there. A killed harvest (of any rank) resumes under any number of ranks, one process included:
        the shards recorded are kept, the others harvested again; each rank saves its pending rows in
        ``pending.shard_NNNNN.safetensors``. Without ``data_parallel`` this process harvests everything (under torchrun
        too: call it on one rank).
        """
        with self._settings_fixed():
            return self._harvest(n_tokens, progress, on_batch, checkpoint_seconds, data_parallel)

    def _harvest(
        self,
        n_tokens: int,
        progress: bool,
        on_batch: Callable[[int, int], object] | None,
        checkpoint_seconds: float,
        data_parallel: bool,
    ) -> int:
        directory = self.activations_dir
        if directory is None:
            raise ValueError("harvest() writes shards: create the store with activations_dir=...")
        shared = data_parallel and distributed.world_size() > 1
        rank, world = (distributed.rank(), distributed.world_size()) if shared else (0, 1)
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            clean_directory(directory)
            if shared and self.manifest() is None:  # the settings every rank's shards are harvested with
                atomic_write_json(directory / MANIFEST, {"version": 1, "settings": self.settings(), "shards": []})
        if shared:
            distributed.barrier()
        manifest = self.manifest() or {"version": 1, "settings": self.settings(), "shards": []}
        plan = self.plan(n_tokens)
        records = self._records()
        done = {e["file"] for e in plan if e in records and (directory / e["file"]).exists()}
        mine = [e for e in plan if e["file"] not in done][rank::world]
        own = directory / f"manifest.rank{rank}.json"  # a shared harvest's record of this rank's shards
        recorded = [e for e in _read_record(own) if e in records] if shared else []
        if shared:  # every rank deals the shards from the same records: none records a new one before all have
            distributed.barrier()

        def finished(entry: dict[str, Any]) -> None:
            done.add(entry["file"])
            if shared:
                recorded.append(entry)
                atomic_write_json(own, {"version": 1, "settings": self.settings(), "shards": recorded})
            else:
                self._merge(manifest, plan, done)

        if not shared:
            self._merge(manifest, plan, done)  # what ranks of a killed shared harvest recorded
        total = sum(e["n_tokens"] for e in mine)
        bar = tqdm(total=total, unit="tok", desc="harvest", disable=not (progress and total and rank == 0))
        due = Cadence(seconds=checkpoint_seconds)
        with stop_on_signals() as stop, closing(bar):  # Ctrl-C / SIGTERM: finish the pass, save the pending rows
            for entry, contexts in self._contexts_of(mine):
                pending_file = self._pending_file(entry) if shared else directory / PENDING
                self._harvest_shard(entry, contexts, pending_file, (due, stop, bar), on_batch, manifest)
                finished(entry)
                if stop:
                    raise stop.interrupted("harvest", directory, f"shard {entry['file']} of {len(plan)} planned")
        if shared:
            distributed.barrier()
            if rank == 0:
                self._merge(manifest, plan, {e["file"] for e in self._records()} | done)
            distributed.barrier()
            manifest = self.manifest() or manifest
        return sum(s["n_tokens"] for s in manifest["shards"])

    def plan(self, n_tokens: int) -> list[dict[str, Any]]:
        """The shards :meth:`harvest` ``(n_tokens)`` writes after those stored: manifest entries ``{"file",
        "first_context", "n_contexts", "n_tokens"}``, from the tokens alone (no forward pass). Forward passes of
        ``batch_contexts`` contexts are added to a shard until it holds ``shard_tokens`` rows, until the store holds
        ``n_tokens`` rows or the corpus ends (the last shard then holds the rest)."""
        manifest = self.manifest()
        index = len(manifest["shards"]) if manifest else 0
        n_tokens -= sum(s["n_tokens"] for s in manifest["shards"]) if manifest else 0
        first = self.harvested_contexts()
        plan: list[dict[str, Any]] = []
        rows = n_contexts = total = 0
        contexts = self.contexts(first)

        def close() -> None:
            nonlocal first, rows, n_contexts
            entry = {"file": f"shard_{index + len(plan):05d}.safetensors", "first_context": first}
            plan.append({**entry, "n_contexts": n_contexts, "n_tokens": rows})
            first, rows, n_contexts = first + n_contexts, 0, 0

        while total < n_tokens:
            batch = list(islice(contexts, self.batch_contexts))
            if not batch:
                break
            kept = int(self._kept(torch.stack(batch)).sum())
            rows, n_contexts, total = rows + kept, n_contexts + len(batch), total + kept
            if rows >= self.shard_tokens:
                close()
        if n_contexts:
            close()
        return plan

    def _contexts_of(self, entries: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], list[Tensor]]]:
        """Each of ``entries`` (planned shards, in corpus order) with its contexts, from one pass over the corpus."""
        if not entries:
            return
        start = entries[0]["first_context"]
        contexts = self.contexts(start)
        for entry in entries:
            skipped = entry["first_context"] - start
            wanted = list(islice(contexts, skipped, skipped + entry["n_contexts"]))
            start = entry["first_context"] + entry["n_contexts"]
            yield entry, wanted

    def _harvest_shard(
        self,
        entry: dict[str, Any],
        contexts: list[Tensor],
        pending_file: Path,
        when: tuple[Cadence, StopFlag, Any],
        on_batch: Callable[[int, int], object] | None,
        manifest: dict[str, Any],
    ) -> None:
        """Run the forward passes of the planned shard ``entry`` (its ``contexts``, after the rows a stopped
        harvest saved for it) and write it. ``when``: the cadence of pending saves, the stop flag and the bar."""
        directory = self.activations_dir
        assert directory is not None
        due, stop, bar = when
        first = entry["first_context"]
        pending, n_contexts = self._pending(entry)
        bar.update(_rows(pending))
        for offset in range(n_contexts, len(contexts), self.batch_contexts):
            batch = contexts[offset : offset + self.batch_contexts]
            rows = self._run(torch.stack(batch).to(self.model.device), first + offset)
            if on_batch is not None:
                on_batch(first + offset, len(batch))
            pending.append(rows)
            n_contexts += len(batch)
            bar.update(len(rows["tokens"]))
            if n_contexts < len(contexts) and (due() or stop):
                if not (directory / MANIFEST).exists():
                    atomic_write_json(directory / MANIFEST, manifest)  # the settings the pending rows were made with
                pending[:] = [_cat(pending)]
                _save_pending(pending_file, pending[0], first, n_contexts)
            if stop and n_contexts < len(contexts):
                where = f"context {first + n_contexts} of shard {entry['file']}"
                raise stop.interrupted("harvest", directory, where)
        merged = _cat(pending)
        if len(merged["tokens"]) != entry["n_tokens"]:
            got = len(merged["tokens"])
            raise RuntimeError(
                f"{entry['file']} was planned with {entry['n_tokens']} rows, the passes gave {got}: the corpus "
                "changed while harvesting; harvest again"
            )
        atomic_write(directory / entry["file"], lambda tmp: save_file(merged, str(tmp)))
        self._pending_file(entry).unlink(missing_ok=True)
        if pending_file == directory / PENDING:  # one process: the only writer of PENDING
            pending_file.unlink(missing_ok=True)

    def _merge(self, manifest: dict[str, Any], plan: list[dict[str, Any]], done: set[str]) -> None:
        """Append to ``manifest`` (and write it) the leading planned shards that are ``done``; once every planned
        shard is in, remove what shared harvests recorded and left pending."""
        assert self.activations_dir is not None
        added = 0
        for entry in plan:
            if entry in manifest["shards"]:
                continue
            if entry["file"] not in done:
                break
            manifest["shards"].append(entry)
            added += 1
        if added:
            atomic_write_json(self.activations_dir / MANIFEST, manifest)
        if all(entry in manifest["shards"] for entry in plan):
            for path in [*self.activations_dir.glob("manifest.rank*.json"), *self._pending_files()]:
                path.unlink(missing_ok=True)

    def _records(self) -> list[dict[str, Any]]:
        """The shards ranks of shared harvests recorded (``manifest.rank*.json``) under this store's settings."""
        assert self.activations_dir is not None
        settings = self.settings()
        out = []
        for path in sorted(self.activations_dir.glob("manifest.rank*.json")):
            record = read_json(path, HARVEST_AGAIN.format(directory=self.activations_dir))
            if isinstance(record, dict) and record.get("settings") == settings:
                out += record["shards"]
        return out

    def _pending_files(self) -> list[Path]:
        assert self.activations_dir is not None
        return sorted(self.activations_dir.glob("pending*.safetensors"))

    def _pending_file(self, entry: dict[str, Any]) -> Path:
        """Where a rank of a shared harvest saves the pending rows of the planned shard ``entry`` (only the rank
        harvesting that shard touches it)."""
        assert self.activations_dir is not None
        return self.activations_dir / f"pending.{Path(entry['file']).stem}.safetensors"

    def _pending(self, entry: dict[str, Any]) -> tuple[list[Rows], int]:
        """The rows a stopped harvest saved for the planned shard ``entry`` and the contexts they cover (``([],
        0)`` when there are none). Metadata and rows come from one open file: another rank may replace its own."""
        fix = "delete it (its rows are harvested again), or choose another activations_dir"
        assert self.activations_dir is not None
        for path in (self.activations_dir / PENDING, self._pending_file(entry)):
            try:
                with reading(path, fix), safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                    start, n_contexts = int(meta["first_context"]), int(meta["n_contexts"])
                    if start == entry["first_context"] and n_contexts < entry["n_contexts"]:
                        return [{name: f.get_tensor(name) for name in f.keys()}], n_contexts  # noqa: SIM118
            except FileNotFoundError:  # removed since it was listed (its shard is done)
                continue
        return [], 0

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


def _read_record(path: Path) -> list[dict[str, Any]]:
    """The shards a rank's ``manifest.rank{R}.json`` records ([] when there is none)."""
    if not path.exists():
        return []
    record = read_json(path, f"delete {path} (its shards are harvested again)")
    return list(record.get("shards", [])) if isinstance(record, dict) else []


def _save_pending(path: Path, rows: Rows, first_context: int, n_contexts: int) -> None:
    """Write the rows of the shard from ``first_context`` harvested so far (``n_contexts`` contexts) to ``path``."""
    meta = {"first_context": str(first_context), "n_contexts": str(n_contexts)}
    atomic_write(path, lambda tmp: save_file(rows, str(tmp), metadata=meta))


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
