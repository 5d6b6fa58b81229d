"""ActivationStore: activations at hook points over a corpus, streamed live or kept in disk shards.

Contexts come from :func:`mechscope.data.corpus.pack_contexts` in a fixed order. Each forward pass runs
``batch_contexts`` of them and stops after the last block any requested hook needs. Rows are the kept
token positions (BOS/EOS/PAD excluded by default), in corpus order.

On disk (``shard_dir``) a harvest writes ``shard_NNNNN.safetensors`` files — one ``[rows, d]`` tensor per
hook name plus ``tokens``, ``context`` and ``position`` ``[rows]`` — and ``manifest.json``, which records
the settings and, per shard, the contexts it covers. Shards and the manifest are written atomically
(temporary file, then rename), so an interrupted harvest resumes at the first context no finished shard
covers: nothing is lost or stored twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mechscope.data.corpus import iter_texts, pack_contexts
from mechscope.files import atomic_write
from mechscope.models.hooked import HookedModel
from mechscope.models.points import token_vectors

MANIFEST = "manifest.json"


class ActivationStore:
    """Activations of ``hook_names`` over a corpus.

    ``source`` is a corpus source (see :func:`mechscope.data.corpus.iter_texts`; default: the embedded
    English prose). Rows are ``[d]`` vectors of one token position; batches are dicts hook name ->
    ``[batch, d]`` (plus ``"tokens"`` ``[batch]``). Per-head points (``attn.hook_z`` ...) are stored as one
    ``[n_heads * d_head]`` vector per token (:func:`~mechscope.models.points.token_vectors`), as SAEs read them.
    """

    def __init__(
        self,
        model: HookedModel,
        hook_names: str | list[str],
        source: str | Path | None = None,
        *,
        context_length: int = 128,
        batch_contexts: int = 8,
        exclude_special: bool = True,
        text_field: str = "text",
        dtype: torch.dtype = torch.float32,
        shard_dir: str | Path | None = None,
        shard_tokens: int = 65536,
    ):
        self.model = model
        self.hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        for name in self.hook_names:
            model.points.resolve(name)  # unknown names fail here, with the closest valid ones
        self.source, self.text_field = source, text_field
        self.context_length, self.batch_contexts = context_length, batch_contexts
        self.exclude_special, self.dtype = exclude_special, dtype
        self.shard_dir = Path(shard_dir) if shard_dir is not None else None
        self.shard_tokens = shard_tokens
        self.stop_at_layer = model.stop_layer_for(self.hook_names)
        tok = model.tokenizer
        self._special = sorted({t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None})

    # ---- identity ------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What determines the stored rows; a shard directory is reused only for identical settings."""
        return {
            "model": self.model.name,
            "family": self.model.cfg.family,
            "hook_names": self.hook_names,
            "source": "default" if self.source is None else str(self.source),
            "text_field": self.text_field,
            "context_length": self.context_length,
            "batch_contexts": self.batch_contexts,
            "exclude_special": self.exclude_special,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ---- live harvesting ----------------------------------------------------------------------------
    def contexts(self, skip: int = 0) -> Iterator[torch.Tensor]:
        """Token contexts ``[context_length]`` in corpus order, from the ``skip``-th on."""
        packed = pack_contexts(iter_texts(self.source, self.text_field), self.model.tokenizer, self.context_length)
        return islice(packed, skip, None)

    def _run(self, tokens: torch.Tensor, first_context: int) -> dict[str, torch.Tensor]:
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

    def stream(self, n_tokens: int | None = None, skip_contexts: int = 0, progress: bool = True):
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
    def manifest(self) -> dict | None:
        """The shard directory's manifest, or None when nothing was harvested there yet."""
        if self.shard_dir is None or not (self.shard_dir / MANIFEST).exists():
            return None
        manifest = json.loads((self.shard_dir / MANIFEST).read_text())
        if manifest["settings"] != self.settings():
            diff = {k: (v, self.settings()[k]) for k, v in manifest["settings"].items() if self.settings()[k] != v}
            raise ValueError(
                f"{self.shard_dir} holds activations harvested with other settings {diff} (stored, requested); "
                "use another shard_dir or the same settings"
            )
        return manifest

    def stored_tokens(self) -> int:
        manifest = self.manifest()
        return sum(s["n_tokens"] for s in manifest["shards"]) if manifest else 0

    def harvest(self, n_tokens: int, progress: bool = True) -> int:
        """Harvest into ``shard_dir`` until it holds at least ``n_tokens`` rows (resuming what is there).

        Returns the rows stored. The corpus running out first is not an error; the count says so.
        """
        if self.shard_dir is None:
            raise ValueError("harvest() writes shards: create the store with shard_dir=...")
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest() or {"version": 1, "settings": self.settings(), "shards": []}
        shards = manifest["shards"]
        stored = sum(s["n_tokens"] for s in shards)
        next_context = shards[-1]["first_context"] + shards[-1]["n_contexts"] if shards else 0
        pending: list[dict[str, torch.Tensor]] = []
        first = next_context

        def flush(n_contexts: int) -> None:
            nonlocal first, stored
            merged = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
            name = f"shard_{len(shards):05d}.safetensors"
            atomic_write(self.shard_dir / name, lambda tmp: save_file(merged, str(tmp)))
            n = len(merged["tokens"])
            shards.append({"file": name, "first_context": first, "n_contexts": n_contexts, "n_tokens": n})
            atomic_write(self.shard_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
            stored += n
            first += n_contexts
            pending.clear()

        n_contexts = 0
        remaining = max(n_tokens - stored, 0)
        for _, count, rows in self.stream(remaining, skip_contexts=next_context, progress=progress and remaining > 0):
            pending.append(rows)
            n_contexts += count
            if sum(len(p["tokens"]) for p in pending) >= self.shard_tokens:
                flush(n_contexts)
                n_contexts = 0
        if pending:
            flush(n_contexts)
        return stored

    def shard_rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """The stored shards one at a time, in corpus order."""
        manifest = self.manifest()
        if not manifest or not manifest["shards"]:
            raise FileNotFoundError(f"no harvested shards in {self.shard_dir}; call harvest(n_tokens) first")
        for shard in manifest["shards"]:
            path = self.shard_dir / shard["file"]
            try:
                yield load_file(str(path))
            except (SafetensorError, FileNotFoundError) as e:
                raise OSError(f"shard {path} cannot be read ({e}); delete it and its manifest entry") from e

    # ---- batches for training --------------------------------------------------------------------------
    def batches(
        self,
        batch_size: int,
        n_tokens: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{hook_name: [batch_size, d], "tokens": [batch_size]}`` from the shards if harvested, else live.

        ``shuffle_buffer`` rows are mixed at a time (0: corpus order): the buffer fills, is permuted, and
        its first half is served while new rows refill it. At most ``n_tokens`` rows are served; the last
        batch may be smaller.
        """
        if self.shard_dir is not None and self.stored_tokens() > 0:
            chunks: Iterator[dict[str, torch.Tensor]] = self.shard_rows()
        else:
            chunks = (rows for _, _, rows in self.stream(n_tokens, progress=progress))
        keys = [*self.hook_names, "tokens"]
        chunks = ({k: c[k] for k in keys} for c in chunks)
        if shuffle_buffer:
            chunks = _mix(chunks, shuffle_buffer, torch.Generator().manual_seed(seed))
        served = 0
        for batch in _rebatch(chunks, batch_size):
            if n_tokens is not None and served >= n_tokens:
                return
            yield batch
            served += len(batch["tokens"])


Rows = dict[str, torch.Tensor]


def _cat(a: Rows | None, b: Rows) -> Rows:
    return b if a is None else {k: torch.cat([a[k], b[k]]) for k in a}


def _mix(chunks: Iterator[Rows], buffer_rows: int, generator: torch.Generator) -> Iterator[Rows]:
    """Rows in shuffled order: fill a buffer of ``buffer_rows``, permute it, serve half, refill."""
    buffer: Rows | None = None
    for chunk in chunks:
        buffer = _cat(buffer, chunk)
        n = len(next(iter(buffer.values())))
        if n >= buffer_rows:
            order = torch.randperm(n, generator=generator)
            yield {k: v[order[: n // 2]] for k, v in buffer.items()}
            buffer = {k: v[order[n // 2 :]] for k, v in buffer.items()}
    if buffer is not None:
        order = torch.randperm(len(next(iter(buffer.values()))), generator=generator)
        yield {k: v[order] for k, v in buffer.items()}


def _rebatch(chunks: Iterator[Rows], batch_size: int) -> Iterator[Rows]:
    """Chunks of any size re-cut into batches of ``batch_size`` rows (the last one may be smaller)."""
    buffer: Rows | None = None
    for chunk in chunks:
        buffer = _cat(buffer, chunk)
        n = len(next(iter(buffer.values())))
        usable = n - n % batch_size
        for start in range(0, usable, batch_size):
            yield {k: v[start : start + batch_size] for k, v in buffer.items()}
        buffer = {k: v[usable:] for k, v in buffer.items()}
    if buffer is not None and len(next(iter(buffer.values()))):
        yield buffer
