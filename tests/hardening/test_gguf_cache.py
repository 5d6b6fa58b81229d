"""Issue 13: a GGUF conversion killed mid-write is cleaned at the next conversion, and the copies older conversions
of the same file made (the file changed, or another converter) are superseded, not accumulated.

The GGUF is a tiny synthetic llama written here with gguf's own writer (a byte-level vocabulary of 258 tokens), so
each conversion takes a fraction of a second; the reference is transformers' own load of the same file.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM

from mechscope import HookedModel
from mechscope.models import loading
from tests.test_faults import dead_pid, temporaries

TOKENS = torch.tensor([[104, 101, 108, 108, 111, 257]])


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0-255 (bytes that print as themselves keep their character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, seed: int, d: int = 16, ff: int = 32) -> Path:
    """A one-layer llama GGUF of float32 random weights with a byte-level tokenizer (+ ``<|endoftext|>``, ``ab``)."""
    rng = np.random.default_rng(seed)
    tokens = [*byte_alphabet(), "<|endoftext|>", "ab"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(d // 2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 1])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    shapes = {"token_embd.weight": (len(tokens), d), "output_norm.weight": (d,), "output.weight": (len(tokens), d)}
    for name, shape in {
        "attn_norm": (d,),
        "attn_q": (d, d),
        "attn_k": (d, d),
        "attn_v": (d, d),
        "attn_output": (d, d),
        "ffn_norm": (d,),
        "ffn_gate": (ff, d),
        "ffn_up": (ff, d),
        "ffn_down": (d, ff),
    }.items():
        shapes[f"blk.0.{name}.weight"] = shape
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_logits(path: Path) -> torch.Tensor:
    """transformers' own load of the GGUF (no cache)."""
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


def load_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return HookedModel.from_pretrained(str(path))(TOKENS)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_a_conversion_is_reused_and_records_its_source(tmp_path, cache):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    want = reference_logits(gguf)
    assert torch.equal(load_logits(gguf), want)
    (converted,) = folders(cache)
    record = json.loads((cache / converted / loading.GGUF_SOURCE).read_text())
    assert record["source"] == str(gguf.resolve()) and record["size"] == gguf.stat().st_size
    assert transformers.__version__ in record["converter"]
    stamp = (cache / converted / "model.safetensors").stat().st_mtime_ns
    assert torch.equal(load_logits(gguf), want)  # the second load reads the cached copy, not a new conversion
    assert folders(cache) == [converted] and (cache / converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_file_or_converter_supersedes_the_old_copy(tmp_path, cache, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=2)
    load_logits(gguf)
    load_logits(other)
    (first, kept) = sorted(folders(cache), key=lambda name: name.startswith("other"))
    write_tiny_gguf(gguf, seed=1)  # the same file, changed: its old conversion can never be used again
    want = reference_logits(gguf)
    assert torch.equal(load_logits(gguf), want)
    (second,) = set(folders(cache)) - {kept}
    assert second != first and folders(cache) == sorted([second, kept])  # another file's conversion stays
    monkeypatch.setattr(loading, "GGUF_CONVERSION", loading.GGUF_CONVERSION + 1)  # a new converter: every copy
    assert torch.equal(load_logits(gguf), want)  # the old one made is superseded, this file's and the other's
    (third,) = folders(cache)
    assert third not in (first, second)
    load_logits(other)
    other.unlink()  # a conversion whose GGUF is gone is removed at the next conversion too
    write_tiny_gguf(gguf, seed=3)
    load_logits(gguf)
    (fourth,) = folders(cache)
    assert fourth.startswith("tiny-") and fourth != third


def test_copies_and_temporaries_of_older_mechscope_versions_are_removed(tmp_path, cache):
    """Before, every conversion of the same file (keyed without the converter) stayed, as did a killed run's
    ``<name>.tmp<pid>`` folder (e.g. 277 MB of a half-written SmolLM2); a live writer's temporary stays."""
    cache.mkdir(parents=True)
    old = ["tiny-0123456789abcdef", f"tiny-0123456789abcdef.tmp{dead_pid()}", f".tiny-fedcba9876543210.tmp{dead_pid()}"]
    live = f".tiny-00000000ffffffff.tmp{os.getppid()}"
    for name in [*old, live]:
        (cache / name).mkdir()
        (cache / name / "model.safetensors").write_bytes(b"half" * 1000)
    (cache / "notes.txt").write_text("not a conversion")
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    assert torch.equal(load_logits(gguf), reference_logits(gguf))
    left = folders(cache)
    assert not set(old) & set(left) and live in left and "notes.txt" in left and len(left) == 3


def test_a_conversion_killed_mid_write_is_cleaned_at_the_next_start(tmp_path, cache):
    """A real SIGKILL: the child converts, pauses once the weights are written into its temporary folder (its
    ``save_pretrained`` is wrapped to write a marker and wait) and is killed there. Nothing appears under the final
    name; the next load removes the torn folder and converts again to transformers' own values."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    marker = tmp_path / "marker"
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery
        try:
            save = transformers.PreTrainedModel.save_pretrained

            def save_then_wait(self, *args, **kwargs):
                save(self, *args, **kwargs)
                marker.write_text("saved")
                time.sleep(60)

            transformers.PreTrainedModel.save_pretrained = save_then_wait  # type: ignore[method-assign]
            HookedModel.from_pretrained(str(gguf))
        finally:
            os._exit(1)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert os.waitpid(pid, os.WNOHANG)[0] == 0 and time.monotonic() < deadline, "the child did not pause"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    (torn,) = temporaries(cache)
    assert torn.endswith(f".tmp{pid}") and (cache / torn / "model.safetensors").stat().st_size > 0
    assert [p for p in folders(cache) if not p.startswith(".")] == []
    assert torch.equal(load_logits(gguf), reference_logits(gguf))
    assert temporaries(cache) == [] and len(folders(cache)) == 1
