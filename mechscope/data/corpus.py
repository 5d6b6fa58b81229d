"""Text corpora and packing them into fixed-length token contexts.

Sources, by what ``source`` is:

- ``None`` or ``"default"``: English prose that ships with Python itself, so it works offline on any
  machine: the documentation topics of ``pydoc_data.topics`` and the docstrings of the standard library
  (read with :mod:`ast`, nothing is imported), in a fixed order.
- a ``.txt``/``.md`` file (one document) or a folder of them (sorted, recursively);
- a ``.jsonl`` file: one JSON object a line, the document in ``text_field``;
- ``"hf:<dataset id>"`` (optionally ``"hf:<id>:<split>"``): a Hugging Face dataset, streamed; needs the
  ``datasets`` package, and the network unless the dataset is cached locally.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mechscope.files import atomic_write_text
from mechscope.models.loading import cache_dir

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def default_texts() -> Iterator[str]:
    """The embedded default corpus: pydoc topics, then standard-library docstrings (modules, classes, functions).

    Parsing the standard library takes several seconds, so the first complete pass is saved as JSONL in
    mechscope's cache directory and later passes read that file.
    """
    saved = cache_dir() / "corpus" / f"default-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if saved.exists():
        yield from _jsonl_texts(saved, "text")
        return
    lines = []
    for text in _build_default_texts():
        lines.append(json.dumps({"text": text}) + "\n")
        yield text
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, "".join(lines))  # only a complete pass is saved
    except OSError as e:  # a cache location that is a file or read-only: the texts were read in memory anyway
        warnings.warn(
            f"could not save the default corpus under {saved.parent} ({e}); it is rebuilt in memory on every pass. "
            "Set MECHSCOPE_CACHE to a writable folder to keep it",
            UserWarning,
            stacklevel=2,
        )


def _build_default_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = set(path.relative_to(stdlib).parts)
        if parts & {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are templates or not UTF-8; they are not prose anyway
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:  # one-liners carry little prose
                    yield doc


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg})") from e
            if text_field not in record:
                raise KeyError(
                    f"{path}:{line_no} has no field {text_field!r} (fields: {sorted(record)}); pass text_field=..."
                )
            yield record[text_field]


def _hf_texts(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("Hugging Face datasets need the datasets package: pip install datasets") from e
    name, _, split = spec.partition(":")
    local = Path(name)
    if local.exists():  # local data files: json/jsonl, csv, parquet or text
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(local.suffix, "text")
        ds = datasets.load_dataset(kind, data_files=str(local), split=split or "train", streaming=True)
    else:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for record in ds:
        yield record[text_field]


def iter_texts(source: str | Path | None = None, text_field: str = "text") -> Iterator[str]:
    """Documents of a corpus source (see the module docstring for what ``source`` may be)."""
    if source is None or source == "default":
        yield from default_texts()
        return
    if isinstance(source, str) and source.startswith("hf:"):
        yield from _hf_texts(source[3:], text_field)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise FileNotFoundError(f"{path} holds no {', '.join(TEXT_SUFFIXES)} or .jsonl files")
        for f in files:
            yield from iter_texts(f, text_field)
    elif path.suffix == ".jsonl":
        yield from _jsonl_texts(path, text_field)
    elif path.is_file():
        yield path.read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(
            f"corpus source {str(source)!r} is not a file or folder; use 'default', a .txt/.md file, a folder, "
            "a .jsonl file, or 'hf:<dataset id>'"
        )


def pack_contexts(
    texts: Iterator[str],
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    prepend_bos: bool = True,
) -> Iterator[torch.Tensor]:
    """Fixed-length contexts ``[context_length]`` from a stream of documents.

    Documents are tokenised without special tokens and joined with EOS into one stream, which is cut into
    pieces of ``context_length`` tokens (``context_length - 1`` plus a leading BOS when ``prepend_bos`` and
    the tokenizer has one). The final partial piece is dropped.
    """
    bos = tokenizer.bos_token_id if prepend_bos else None
    body = context_length - (bos is not None)
    if body < 1:
        raise ValueError(f"context_length must be at least {1 + (bos is not None)}, got {context_length}")
    eos = tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        n_full = len(buffer) // body
        for i in range(n_full):
            yield torch.tensor(head + buffer[i * body : (i + 1) * body], dtype=torch.long)
        del buffer[: n_full * body]
