"""Corpora, packing and the ActivationStore, against by-hand harvesting with run_with_cache."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from mechscope.data import ActivationStore, default_texts, iter_texts, pack_contexts
from mechscope.models.names import stop_layer_for
from mechscope.models.tokenizer import byte_tokenizer

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"]


def test_default_corpus_is_english_prose_and_deterministic():
    first = list(islice(default_texts(), 50))
    assert first == list(islice(default_texts(), 50))
    text = " ".join(first)
    assert len(text) > 20_000 and text.count(" the ") > 100


def test_pack_contexts_by_hand():
    tok = byte_tokenizer()
    eos = bos = tok.eos_token_id  # the byte tokenizer uses one id for both
    contexts = list(pack_contexts(iter(["abcd", "efghij"]), tok, context_length=4))
    stream = [*tok("abcd")["input_ids"], eos, *tok("efghij")["input_ids"], eos]  # 12 tokens
    assert [c.tolist() for c in contexts] == [[bos, *stream[i : i + 3]] for i in (0, 3, 6, 9)]
    no_bos = list(pack_contexts(iter(["abcd", "efghij"]), tok, context_length=4, prepend_bos=False))
    assert [c.tolist() for c in no_bos] == [stream[0:4], stream[4:8], stream[8:12]]


def test_text_file_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n\n" + json.dumps({"body": "delta"}) + "\n")
    assert list(iter_texts(tmp_path / "a.txt")) == ["alpha text"]
    assert list(iter_texts(tmp_path / "c.jsonl", text_field="body")) == ["gamma", "delta"]
    with pytest.raises(KeyError, match="text_field"):
        list(iter_texts(tmp_path / "c.jsonl"))
    (tmp_path / "c.jsonl").unlink()
    assert list(iter_texts(tmp_path)) == ["alpha text", "beta text"]
    with pytest.raises(FileNotFoundError, match="hf:<dataset id>"):
        list(iter_texts(tmp_path / "missing"))


def test_hugging_face_datasets_source_from_local_files(tmp_path):
    """``hf:<file>[:split]`` goes through ``datasets.load_dataset`` (json/csv/parquet builders), record order kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first document", "second, with a comma", 'third "quoted"']
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    quoted = [t.replace('"', '""') for t in texts]  # CSV escapes a quote by doubling it
    (tmp_path / "d.csv").write_text("body,n\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(quoted)))
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    assert list(iter_texts(f"hf:{tmp_path / 'd.jsonl'}")) == texts
    assert list(iter_texts(f"hf:{tmp_path / 'd.csv'}:train", text_field="body")) == texts
    assert list(iter_texts(f"hf:{tmp_path / 'd.parquet'}")) == texts
    with pytest.raises(KeyError):
        list(iter_texts(f"hf:{tmp_path / 'd.jsonl'}", text_field="body"))


def test_stop_layer_for():
    assert stop_layer_for(["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"], 4) == 3
    assert stop_layer_for(["hook_embed"], 4) == 0
    assert stop_layer_for(["blocks.1.hook_resid_pre", "ln_final.hook_normalized"], 4) is None


def by_hand_rows(model, contexts: list[torch.Tensor], name: str, special: list[int]) -> torch.Tensor:
    """Reference: run_with_cache on each context, keep the non-special positions, concatenate."""
    rows = []
    for ctx in contexts:
        _, cache = model.run_with_cache(ctx[None], names_filter=name)
        keep = ~torch.isin(ctx, torch.tensor(special))
        rows.append(cache[name][0][keep])
    return torch.cat(rows)


@pytest.fixture
def text_source(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


def test_stream_equals_by_hand_and_stops_early(llama, text_source):
    store = ActivationStore(llama, HOOKS, text_source, context_length=16, batch_contexts=3)
    assert store.stop_at_layer == 1
    ran = []
    handle = llama.model.model.layers[1].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        chunks = list(store.stream(n_tokens=100, progress=False))
    finally:
        handle.remove()
    assert ran == []  # block 1 is never needed
    n_contexts = sum(count for _, count, _ in chunks)
    contexts = list(islice(store.contexts(), n_contexts))
    special = [llama.tokenizer.eos_token_id]
    for name in HOOKS:
        got = torch.cat([rows[name] for _, _, rows in chunks])
        torch.testing.assert_close(got, by_hand_rows(llama, contexts, name, special), atol=1e-5, rtol=1e-5)
    tokens = torch.cat([rows["tokens"] for _, _, rows in chunks])
    assert not torch.isin(tokens, torch.tensor(special)).any()
    assert len(tokens) >= 100


def test_interrupted_harvest_resumes_without_loss_or_duplicates(llama, text_source, tmp_path, monkeypatch):
    kwargs = dict(context_length=16, batch_contexts=2, shard_tokens=40)
    full = ActivationStore(llama, HOOKS, text_source, shard_dir=tmp_path / "full", **kwargs)
    full.harvest(300, progress=False)

    part = ActivationStore(llama, HOOKS, text_source, shard_dir=tmp_path / "part", **kwargs)
    real_run, calls = part._run, []

    def crash_on_fifth(tokens, first_context):
        calls.append(first_context)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_run(tokens, first_context)

    monkeypatch.setattr(part, "_run", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        part.harvest(300, progress=False)
    assert 0 < part.stored_tokens() < 300
    assert not list((tmp_path / "part").glob(".*tmp*"))  # nothing half-written
    monkeypatch.undo()
    resumed = ActivationStore(llama, HOOKS, text_source, shard_dir=tmp_path / "part", **kwargs)
    assert resumed.harvest(300, progress=False) == full.stored_tokens()

    def concat(store, key):
        return torch.cat([s[key] for s in store.shard_rows()])

    for key in [*HOOKS, "tokens", "context", "position"]:
        assert torch.equal(concat(resumed, key), concat(full, key)), key
    # contexts are consecutive and none repeats
    ctx = concat(resumed, "context").unique_consecutive()
    assert torch.equal(ctx, torch.arange(len(ctx)))


def test_settings_mismatch_is_refused(llama, text_source, tmp_path):
    ActivationStore(llama, HOOKS, text_source, context_length=16, shard_dir=tmp_path).harvest(20, progress=False)
    other = ActivationStore(llama, HOOKS, text_source, context_length=32, shard_dir=tmp_path)
    with pytest.raises(ValueError, match="context_length"):
        other.harvest(20, progress=False)


def test_batches_shuffle_is_a_permutation(llama, text_source, tmp_path):
    store = ActivationStore(llama, HOOKS[:1], text_source, context_length=16, shard_dir=tmp_path, shard_tokens=50)
    stored = store.harvest(200, progress=False)
    ordered = list(store.batches(32))
    mixed = list(store.batches(32, shuffle_buffer=64, seed=1))
    assert [len(b["tokens"]) for b in ordered][:-1] == [32] * (len(ordered) - 1)
    a = torch.cat([b[HOOKS[0]] for b in ordered])
    b = torch.cat([b[HOOKS[0]] for b in mixed])
    assert len(a) == len(b) == stored
    assert not torch.equal(a, b)
    assert torch.equal(a[a[:, 0].argsort()], b[b[:, 0].argsort()])
    again = torch.cat([b[HOOKS[0]] for b in store.batches(32, shuffle_buffer=64, seed=1)])
    assert torch.equal(b, again)
    live = ActivationStore(llama, HOOKS[:1], text_source, context_length=16)
    first = next(live.batches(32))
    torch.testing.assert_close(first[HOOKS[0]], a[:32], atol=1e-5, rtol=1e-5)
    assert sum(len(x["tokens"]) for x in live.batches(32, n_tokens=70)) == 96  # whole batches up to n_tokens
