"""Neuron / direction tools against a brute-force scan and by-hand hooked losses."""

from __future__ import annotations

import pytest
import torch

from mechscope.models.hooked import lm_loss
from mechscope.tools.neurons import NeuronTools

HOOK = "blocks.1.mlp.hook_post"


@pytest.fixture
def corpus() -> torch.Tensor:
    return torch.randint(0, 50256, (5, 16), generator=torch.Generator().manual_seed(7))


def test_top_neuron_examples_match_brute_force(llama, corpus):
    examples = NeuronTools(llama).top_activating(HOOK, neuron=3, k=5, corpus=corpus, batch_size=2, window=(2, 1))
    scan = []
    for row in range(corpus.shape[0]):
        _, cache = llama.run_with_cache(corpus[row : row + 1], names_filter=HOOK)
        for pos in range(corpus.shape[1]):
            scan.append((cache[HOOK][0, pos, 3].item(), row, pos))
    scan.sort(reverse=True)
    assert [(e["context"], e["position"]) for e in examples] == [(r, p) for _, r, p in scan[:5]]
    assert [e["value"] for e in examples] == pytest.approx([v for v, _, _ in scan[:5]], abs=1e-5)
    first = examples[0]
    row, pos = first["context"], first["position"]
    want = [llama.tokenizer.decode([t]) for t in corpus[row, max(0, pos - 2) : pos + 2].tolist()]
    assert first["tokens"] == want and first["tokens"][first["index"]] == first["token"]


def test_top_direction_examples(llama, corpus):
    d = torch.randn(llama.cfg.d_model, generator=torch.Generator().manual_seed(1))
    name = "blocks.0.hook_resid_post"
    examples = NeuronTools(llama).top_activating(name, direction=d, k=3, corpus=corpus)
    _, cache = llama.run_with_cache(corpus, names_filter=name)
    values = (cache[name] @ d).flatten()
    assert [e["value"] for e in examples] == pytest.approx(values.topk(3).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_neuron_ablation_matches_hooked_loss(llama, corpus, mode):
    tool = NeuronTools(llama)
    out = tool.ablation_effect(HOOK, neuron=5, mode=mode, corpus=corpus, batch_size=2)
    _, cache = llama.run_with_cache(corpus, names_filter=HOOK)
    fill = cache[HOOK][..., 5].mean().item() if mode == "mean" else 0.0

    def ablate(x, hook):
        x[..., 5] = fill

    with torch.no_grad():
        loss = lm_loss(llama(corpus), corpus).item()
        ablated = lm_loss(llama.run_with_hooks(corpus, fwd_hooks=[(HOOK, ablate)]), corpus).item()
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ablated_loss"] == pytest.approx(ablated, rel=1e-5)
    assert out["delta"] != 0


def test_direction_projected_out(gpt2, corpus):
    name = "blocks.0.hook_resid_mid"
    d = torch.randn(gpt2.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 3
    out = NeuronTools(gpt2).ablation_effect(name, direction=d, corpus=corpus)
    u = d / d.norm()

    def project_out(x, hook):
        return x - torch.outer((x @ u).flatten(), u).reshape(x.shape)

    with torch.no_grad():
        ablated = lm_loss(gpt2.run_with_hooks(corpus, fwd_hooks=[(name, project_out)]), corpus).item()
    assert out["ablated_loss"] == pytest.approx(ablated, rel=1e-5)


def test_text_corpus_and_errors(llama, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    tool = NeuronTools(llama)
    tokens = tool.corpus_tokens(str(path), n_tokens=128, context_length=32)
    assert tokens.shape == (4, 32)
    assert len(tool.top_activating(HOOK, neuron=0, k=4, corpus=str(path), n_tokens=128, context_length=32)) == 4
    with pytest.raises(ValueError, match="exactly one"):
        tool.top_activating(HOOK, corpus=tokens)
    with pytest.raises(ValueError, match="valid indices"):
        tool.top_activating(HOOK, neuron=10**6, corpus=tokens)
    with pytest.raises(ValueError, match="mode"):
        tool.ablation_effect(HOOK, neuron=0, mode="resample", corpus=tokens)
