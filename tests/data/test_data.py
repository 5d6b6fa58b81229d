"""Corpora, packing and the ActivationStore, against by-hand harvesting with run_with_cache."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from mechscope.data import ActivationStore, default_texts, iter_texts, pack_contexts
from mechscope.files import SettingsMismatch
from mechscope.models.names import stop_layer_for
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.settings import DeprecatedSetting

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


def test_interrupted_harvest_resumes_without_loss_or_duplicates(llama, text_source, tmp_path):
    kwargs = dict(context_length=16, batch_contexts=2, shard_tokens=40)
    full = ActivationStore(llama, HOOKS, text_source, activations_dir=tmp_path / "full", **kwargs)
    full.harvest(300, progress=False)

    part = ActivationStore(llama, HOOKS, text_source, activations_dir=tmp_path / "part", **kwargs)
    calls = []

    def crash_on_fifth(first_context, n_contexts):
        calls.append(first_context)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        part.harvest(300, progress=False, on_batch=crash_on_fifth)
    assert 0 < part.stored_tokens() < 300
    assert not list((tmp_path / "part").glob(".*tmp*"))  # nothing half-written
    resumed = ActivationStore(llama, HOOKS, text_source, activations_dir=tmp_path / "part", **kwargs)
    assert resumed.harvest(300, progress=False) == full.stored_tokens()

    def concat(store, key):
        return torch.cat([s[key] for s in store.shard_rows()])

    for key in [*HOOKS, "tokens", "context", "position"]:
        assert torch.equal(concat(resumed, key), concat(full, key)), key
    # contexts are consecutive and none repeats
    ctx = concat(resumed, "context").unique_consecutive()
    assert torch.equal(ctx, torch.arange(len(ctx)))
    assert resumed.harvested_contexts() == len(ctx)
    chunked = [rows for _, rows in resumed.chunks()]
    for key in [*HOOKS, "tokens", "context", "position"]:
        assert torch.equal(torch.cat([c[key] for c in chunked]), concat(full, key)), key


def test_settings_mismatch_is_refused(llama, text_source, tmp_path):
    first = ActivationStore(llama, HOOKS, text_source, context_length=16, activations_dir=tmp_path)
    stored = first.harvest(20, progress=False)
    other = ActivationStore(llama, HOOKS, text_source, context_length=32, activations_dir=tmp_path)
    mismatch = r"other settings \{'context_length': \(16, 32\)\} \(stored, requested\)"
    with pytest.raises(SettingsMismatch, match=mismatch):
        other.harvest(20, progress=False)
    with pytest.warns(DeprecatedSetting) as caught:  # the keywords' names before
        old = ActivationStore(llama, HOOKS, source=text_source, context_length=16, shard_dir=tmp_path)
    assert [str(w.message) for w in caught] == [
        "ActivationStore(source=...) is deprecated: use corpus=",
        "ActivationStore(shard_dir=...) is deprecated: use activations_dir=",
    ]
    assert (old.corpus, old.activations_dir, old.stored_tokens()) == (text_source, tmp_path, stored)


def test_batches_shuffle_is_a_permutation(llama, text_source, tmp_path):
    store = ActivationStore(llama, HOOKS[:1], text_source, context_length=16, activations_dir=tmp_path, shard_tokens=50)
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


def test_resumable_batches_resume_inside_a_forward_pass(llama, text_source, tmp_path):
    size, group = 23, 3  # batches of 23 rows end inside forward passes of 3 contexts (45 rows)
    store = ActivationStore(llama, HOOKS[:1], text_source, context_length=16, batch_contexts=group)
    batches = list(store.resumable_batches(size))
    everything = torch.cat([rows[HOOKS[0]] for rows, _ in batches])
    assert [len(rows["tokens"]) for rows, _ in batches[:-1]] == [size] * (len(batches) - 1)
    assert 0 < len(batches[-1][0]["tokens"]) <= size  # the corpus ran out: a last, smaller batch
    contexts = torch.stack(list(store.contexts()))
    expected = []
    for start in range(0, len(contexts), group):  # run_with_cache over the same groups of contexts
        tokens = contexts[start : start + group]
        with torch.no_grad():
            _, cache = llama.run_with_cache(tokens, names_filter=HOOKS[0])
        expected.append(cache[HOOKS[0]][tokens != llama.tokenizer.eos_token_id])
    torch.testing.assert_close(everything, torch.cat(expected), rtol=0, atol=0)
    for i in (0, 1, 2):
        rest = list(store.resumable_batches(size, batches[i][1]))
        assert len(rest) == len(batches) - i - 1
        for (a, _), (b, _) in zip(rest, batches[i + 1 :], strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    kwargs = dict(context_length=16, batch_contexts=group, activations_dir=tmp_path, shard_tokens=50)
    sharded = ActivationStore(llama, HOOKS[:1], text_source, **kwargs)
    sharded.harvest(200, progress=False)  # shards of two passes: batches resume inside a shard too
    from_disk = list(sharded.resumable_batches(size))
    from_disk_rows = torch.cat([rows[HOOKS[0]] for rows, _ in from_disk])
    torch.testing.assert_close(from_disk_rows, everything[: sharded.stored_tokens()])
    for i in (0, 3):
        rest = list(sharded.resumable_batches(size, from_disk[i][1]))
        assert len(rest) == len(from_disk) - i - 1
        assert all(torch.equal(a[k], b[k]) for (a, _), (b, _) in zip(rest, from_disk[i + 1 :], strict=True) for k in a)
