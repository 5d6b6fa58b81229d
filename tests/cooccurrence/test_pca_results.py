"""Subspace-PCA results files, read back with h5py and checked against a PCA, tokens and context strings built here
by hand from a byte tokenizer (one token per ASCII character)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mechscope.cooccurrence import (
    Subgraph,
    context_strings,
    load_pca_results,
    save_pca_results,
    subgraph_pca_results,
)
from mechscope.models.tokenizer import byte_tokenizer
from tests.cooccurrence.test_subspace import reference_pca

TEXTS = ["the cat sat on the mat", "dogs bark at cats", "a bird sang"]
D_SAE, D_IN, WINDOW, MAX_EXAMPLES = 16, 6, 3, 20


def corpus() -> tuple[list[str], list[int], list[int], list[int]]:
    """``(chars, token ids, context ids, positions)`` of every kept row; positions start at 1 (BOS left out) and
    the second text also loses its position 5, so windows go by position, not by row."""
    tok = byte_tokenizer()
    chars, ids, ctx, pos = [], [], [], []
    for c, text in enumerate(TEXTS):
        for p, (ch, i) in enumerate(zip(text, tok(text, add_special_tokens=False)["input_ids"], strict=True)):
            if (c, p + 1) != (1, 5):
                chars.append(ch), ids.append(i), ctx.append(100 + c), pos.append(p + 1)
    return chars, ids, ctx, pos


def expected_context(chars: list[str], ctx: list[int], pos: list[int], r: int) -> str:
    near = [k for k in range(len(chars)) if ctx[k] == ctx[r] and abs(pos[k] - pos[r]) <= WINDOW]
    before = "".join(chars[k] for k in near if pos[k] < pos[r])
    after = "".join(chars[k] for k in near if pos[k] > pos[r])
    return f"{before}|{chars[r]}|{after}"


def test_results_file_holds_pca_tokens_contexts_and_top_tokens(tmp_path):
    chars, ids, ctx, pos = corpus()
    g = torch.Generator().manual_seed(3)
    acts = torch.relu(torch.randn(len(ids), D_SAE, generator=g) - 0.5)
    acts[:, 12:15] = 0  # subgraph 7 never fires
    w_dec = torch.randn(D_SAE, D_IN, generator=g)
    batches = [acts[:25], acts[25:]]  # split inside the second text
    subs = {
        4: Subgraph(4, [1, 2, 3], [(1, 2), (2, 3)], [0.5, 0.5]),
        7: Subgraph(7, [12, 13, 14], [], []),
        9: Subgraph(9, [5, 8, 10], [], []),
        11: Subgraph(11, [0, 6], [(0, 6)], [0.4]),
    }
    candidates = {3: [subs[4], subs[7], subs[9]], 2: [subs[11]], 5: []}
    tensors = [torch.tensor(x) for x in (ids, ctx, pos)]
    with pytest.warns(UserWarning, match="subgraph 7 fires on too few tokens"):
        results = subgraph_pca_results(
            candidates, batches, *tensors, w_dec, byte_tokenizer(), 1.5,
            max_examples=MAX_EXAMPLES, context_window=WINDOW,
        )  # fmt: skip
    paths = save_pca_results(tmp_path, results)
    names = [f"graph_analysis_results_size_{n}_activation_1_5.h5" for n in (2, 3, 5)]
    assert paths == [tmp_path / "pca" / name for name in names]

    a = acts.numpy()
    with h5py.File(paths[1], "r") as f:
        assert sorted(f) == ["subgraph_4", "subgraph_9"]
        assert (f.attrs["subgraph_size"], f.attrs["activity_threshold"], f.attrs["context_window"]) == (3, 1.5, 3)
        for sid in (4, 9):
            nodes, grp = subs[sid].nodes, f[f"subgraph_{sid}"]
            rows = np.flatnonzero((a[:, nodes] > 0).any(axis=1))[:MAX_EXAMPLES]
            assert len(rows) == MAX_EXAMPLES  # the cap binds
            np.testing.assert_array_equal(grp["nodes"][()], nodes)
            np.testing.assert_array_equal(grp["pca_df/point_id"][()], rows)
            np.testing.assert_array_equal(grp["all_token_dfs/token_id"][()], np.array(ids)[rows])
            np.testing.assert_array_equal(grp["all_token_dfs/batch"][()], np.array(ctx)[rows])
            np.testing.assert_array_equal(grp["all_token_dfs/pos"][()], np.array(pos)[rows])
            np.testing.assert_allclose(grp["all_graph_feature_acts"][()], a[rows][:, nodes])
            assert grp["all_examples_found"][()] == MAX_EXAMPLES

            vs, coords, ratio = reference_pca(a[rows][:, nodes], w_dec.numpy()[nodes], 3)
            got = np.stack([grp[f"pca_df/PC{k}"][()] for k in (1, 2, 3)], axis=1)
            np.testing.assert_allclose(got, coords, atol=1e-4)
            np.testing.assert_allclose(grp["components"][()], vs, atol=1e-5)
            np.testing.assert_allclose(grp["explained_variance_ratio"][()], ratio, rtol=1e-5)

            info = grp["all_max_feature_info"][()]
            np.testing.assert_allclose(info[:, 0], a[rows].max(axis=1))
            np.testing.assert_array_equal(info[:, 1], a[rows].argmax(axis=1))
            np.testing.assert_array_equal(info[:, 2], np.isin(a[rows].argmax(axis=1), nodes))

            tokens = [chars[r] for r in rows]
            contexts = [expected_context(chars, ctx, pos, r) for r in rows]
            # fixed-length UTF-8 strings: h5py reads bytes (numpy "S"), as the reference app's readers expect
            assert grp["pca_df/tokens"].dtype.kind == "S"
            assert grp["pca_df/tokens"].id.get_type().get_cset() == h5py.h5t.CSET_UTF8
            assert [b.decode() for b in grp["pca_df/tokens"][()]] == tokens
            assert list(grp["pca_df/tokens"].asstr()[()]) == tokens
            assert list(grp["pca_df/context"].asstr()[()]) == contexts
            counts: dict[str, int] = {}
            for t in tokens:
                counts[t] = counts.get(t, 0) + 1
            top = sorted(counts, key=lambda t: -counts[t])[:3]  # stable: ties by first appearance
            assert list(grp["top_3_tokens"].asstr()[()]) == top
            assert list(grp["top_3_token_counts"][()]) == [counts[t] for t in top]
            assert grp["example_context"].shape == ()
            assert grp["example_context"].asstr()[()] == contexts[tokens.index(top[0])]

    with h5py.File(paths[2], "r") as f:
        assert len(f) == 0 and f.attrs["subgraph_size"] == 5

    loaded = load_pca_results(paths[1])
    assert sorted(loaded) == [4, 9]
    with h5py.File(paths[1], "r") as f:
        grp = f["subgraph_9"]
        result = loaded[9]
        assert result.pca.nodes == [5, 8, 10] and result.subgraph_id == 9
        np.testing.assert_array_equal(result.pca.coords[:, 1], grp["pca_df/PC2"][()])
        np.testing.assert_array_equal(result.pca.token_index, grp["pca_df/point_id"][()])
        np.testing.assert_array_equal(result.pca.top_index, grp["all_max_feature_info"][()][:, 1])
        assert result.contexts == list(grp["pca_df/context"].asstr()[()])
        assert result.example_context == grp["example_context"].asstr()[()]
    pair = load_pca_results(paths[0])[11].pca
    assert pair.coords.shape[1] == 3 and np.all(pair.coords[:, 2] == 0)  # a 2-latent subspace has 2 dimensions

    # files of earlier versions, with variable-length strings, read back the same
    with h5py.File(paths[1], "r+") as f:
        for grp in f.values():
            for name in ("pca_df/tokens", "pca_df/context", "top_3_tokens", "example_context"):
                text = grp[name].asstr()[()]
                del grp[name]
                grp.create_dataset(
                    name, data=text.tolist() if isinstance(text, np.ndarray) else text, dtype=h5py.string_dtype()
                )
            assert grp["pca_df/tokens"].dtype == h5py.string_dtype()
    old = load_pca_results(paths[1])
    for sid in (4, 9):
        got, want = old[sid], loaded[sid]
        assert (got.tokens, got.contexts, got.top_tokens, got.example_context) == (
            want.tokens, want.contexts, want.top_tokens, want.example_context
        )  # fmt: skip


def test_context_marks_the_token_that_completes_a_character_and_rejects_unordered_rows():
    tok = byte_tokenizer()
    ids = np.array(tok("ab\u00e9 c", add_special_tokens=False)["input_ids"])  # "é" is two byte tokens
    zeros, positions = np.zeros(len(ids), dtype=np.int64), np.arange(len(ids))
    got = context_strings(tok, ids, zeros, positions, np.array([0, 2, 3, 5]), window=10)
    assert got == ["|a|b\u00e9 c", "ab||\u00e9 c", "ab|\u00e9| c", "ab\u00e9 |c|"]
    assert context_strings(tok, ids, zeros, positions, np.array([3]), window=1) == ["|\u00e9| "]
    with pytest.raises(ValueError, match="increasing position order"):
        context_strings(tok, ids, zeros, positions[::-1].copy(), np.array([0]), window=1)
