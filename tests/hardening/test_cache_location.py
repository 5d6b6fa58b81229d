"""Issue 13: a MECHSCOPE_CACHE that is a file or read-only leaves the default corpus working, with a warning."""

from __future__ import annotations

import os

import pytest

from mechscope.data import corpus

TEXTS = ["one document", "another document"]


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_the_default_corpus_works_in_memory_when_the_cache_cannot_be_written(tmp_path, monkeypatch, kind):
    location = tmp_path / "cache"
    if kind == "file":
        location.write_text("not a folder")
    else:
        location.mkdir()
        location.chmod(0o500)
        if os.access(location, os.W_OK):  # root ignores permissions: a file still blocks every write
            location.chmod(0o700)
            location.rmdir()
            location.write_text("not a folder")
    monkeypatch.setenv("MECHSCOPE_CACHE", str(location))
    monkeypatch.setattr(corpus, "_build_default_texts", lambda: iter(TEXTS))
    with pytest.warns(UserWarning, match="Set MECHSCOPE_CACHE to a writable folder"):
        assert list(corpus.default_texts()) == TEXTS
    if location.is_dir():
        location.chmod(0o700)
        assert not any(location.iterdir())


def test_a_writable_cache_keeps_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_build_default_texts", lambda: iter(TEXTS))
    assert list(corpus.default_texts()) == TEXTS
    monkeypatch.setattr(corpus, "_build_default_texts", lambda: iter(["never read"]))
    assert list(corpus.default_texts()) == TEXTS
