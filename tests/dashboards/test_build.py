"""compute_dashboards on stored rows, against the dense latents computed plainly."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from mechscope.dashboards.build import DashboardSettings, chunk_list, compute_dashboards
from mechscope.dashboards.layout import read_array, read_meta, read_vocab
from mechscope.dashboards.outputs import load_dashboards, save_dashboards
from mechscope.sae import SAE, SAEConfig
from mechscope.settings import ConfigError
from tests.sae_utils import random_weights

D_IN, D_SAE, N_CONTEXTS, CONTEXT_LENGTH, HOOK = 6, 20, 7, 16, "blocks.0.hook_resid_post"


def stored_rows(seed: int = 0):
    """Rows as the activation store keeps them: position 0 (BOS) left out, in chunks of uneven size."""
    g = torch.Generator().manual_seed(seed)
    context = torch.arange(N_CONTEXTS).repeat_interleave(CONTEXT_LENGTH - 1)
    position = torch.arange(1, CONTEXT_LENGTH).repeat(N_CONTEXTS)
    rows = {
        HOOK: torch.randn(context.numel(), D_IN, generator=g) * 2,
        "tokens": torch.randint(0, 30, (context.numel(),), generator=g),
        "context": context,
        "position": position,
    }
    bounds = [0, 13, 40, 41, context.numel()]
    return rows, [{k: v[a:b] for k, v in rows.items()} for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_dashboards_equal_the_dense_latents(architecture):
    sae = SAE(SAEConfig(D_IN, D_SAE, architecture, k=4 if architecture == "topk" else None))
    sae.load_state_dict(random_weights(D_IN, D_SAE, 0))
    sae.eval()
    rows, chunks = stored_rows()
    W_U, norm = torch.randn(D_IN, 30), torch.rand(D_IN) + 0.5  # noqa: N806
    s = DashboardSettings(n_top=3, window=2, n_bins=3, per_bin=2, histogram_bins=4, n_logits=5)
    dash = compute_dashboards(sae, HOOK, chunk_list(chunks), W_U, norm, s, progress=False)

    dense = sae.encode(rows[HOOK]).detach()
    row_of = {(int(c), int(p)): r for r, (c, p) in enumerate(zip(rows["context"], rows["position"], strict=True))}
    assert dash.n_tokens == len(dense)
    assert torch.equal(dash.firing, (dense > 0).sum(dim=0))
    assert_close(dash.max_activation, dense.max(dim=0).values)
    assert torch.equal(dash.histogram.sum(dim=1), dash.firing)
    assert torch.equal(dash.bin_counts.view(D_SAE, 3).sum(dim=1), dash.firing)
    assert torch.equal(dash.dead_latents(), (dense.max(dim=0).values == 0).nonzero()[:, 0])
    for latent in range(D_SAE):
        want = dense[:, latent].sort(descending=True).values[:3]
        want = want[want > 0]
        assert_close(dash.top.values[latent, : len(want)], want)  # encoded in chunks: last-bit differences
        for slot in range(3):  # every window is the stored tokens and the latent's activations around the example
            c, p = int(dash.top.context[latent, slot]), int(dash.top.position[latent, slot])
            if c < 0:
                continue
            for col, q in enumerate(range(p - 2, p + 3)):
                r = row_of.get((c, q))
                assert int(dash.top.tokens[latent, slot, col]) == (-1 if r is None else int(rows["tokens"][r]))
                want_act = 0.0 if r is None else float(dense[r, latent])
                assert float(dash.top.activations[latent, slot, col]) == pytest.approx(want_act, abs=1e-6)
        for b in range(3):  # sampled examples lie in the bin they are filed under
            group = latent * 3 + b
            lo, hi = float(dash.bin_edges[latent, b]), float(dash.bin_edges[latent, b + 1])
            values = dash.bins.values[group][dash.bins.context[group] >= 0]
            assert ((values > lo) & (values <= hi)).all()
            assert torch.equal(dash.bins.activations[group, : len(values), 2], values)
    effects = (sae.W_dec.detach() * norm) @ W_U
    assert torch.equal(dash.logits.top_tokens, effects.topk(5, dim=1).indices)


def test_saved_dashboards_read_back_equal(tmp_path):
    sae = SAE(SAEConfig(D_IN, D_SAE, "topk", k=3))
    sae.load_state_dict(random_weights(D_IN, D_SAE, 1))
    _, chunks = stored_rows(1)
    dash = compute_dashboards(sae, HOOK, chunk_list(chunks), torch.randn(D_IN, 30), None, progress=False)
    save_dashboards(tmp_path, dash, {"hook_name": HOOK}, vocab=[f"<{i}>" for i in range(30)])
    back = load_dashboards(tmp_path)
    assert back.settings == dash.settings and back.n_tokens == dash.n_tokens
    for name in ("firing", "bin_counts", "max_activation", "histogram", "bin_edges", "histogram_edges"):
        assert torch.equal(getattr(back, name), getattr(dash, name))
    for group in ("top", "bins"):
        for field in ("values", "context", "position", "tokens", "activations"):
            assert torch.equal(getattr(getattr(back, group), field), getattr(getattr(dash, group), field))
    assert torch.equal(back.logits.bottom_tokens, dash.logits.bottom_tokens)
    assert torch.equal(torch.from_numpy(read_array(tmp_path, "top.context")), dash.top.context)
    assert read_meta(tmp_path)["source"] == {"hook_name": HOOK}
    assert read_vocab(tmp_path)[7] == "<7>"


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"\[dashboards\]\.n_top"):
        DashboardSettings(n_top=0)
