"""Issue 13: caches are keyed by the model's weights, not only its name (every random model is ``random-llama``)."""

from __future__ import annotations

import pytest
import torch

from mechscope import HookedAutoConfig, HookedModel
from mechscope.cooccurrence import CoocConfig, CountingConfig
from mechscope.cooccurrence.pipeline import count_settings
from mechscope.data.store import ActivationStore
from mechscope.files import SettingsMismatch
from mechscope.models.hooked import sample_positions
from mechscope.sae import SAEConfig, SparseAutoencoder

HOOK = "blocks.0.hook_resid_post"


def _model(seed: int) -> HookedModel:
    torch.manual_seed(seed)
    return HookedModel(HookedAutoConfig("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64))


def test_fingerprint_tells_weights_apart_and_is_stable():
    a, b = _model(0), _model(1)
    assert a.name == b.name == "random-llama"
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == _model(0).fingerprint()
    with torch.no_grad():
        a.model.lm_head.weight[0, 0] += 1.0  # sample index 0 of every tensor is always read
    assert a.fingerprint() != _model(0).fingerprint()


def test_two_models_of_the_same_name_do_not_share_activation_shards(tmp_path):
    a, b = _model(0), _model(1)
    ActivationStore(a, HOOK, None, context_length=8, batch_contexts=2, activations_dir=tmp_path).harvest(32)
    same = ActivationStore(_model(0), HOOK, None, context_length=8, batch_contexts=2, activations_dir=tmp_path)
    assert same.stored_tokens() >= 32  # the same weights reuse the shards
    other = ActivationStore(b, HOOK, None, context_length=8, batch_contexts=2, activations_dir=tmp_path)
    with pytest.raises(SettingsMismatch, match="model_fingerprint"):
        other.manifest()


def test_two_models_of_the_same_name_do_not_share_cooccurrence_counts(tmp_path):
    config = CoocConfig(CountingConfig(model="random-llama", sae="unused"), results_dir=str(tmp_path))
    sae = {HOOK: SparseAutoencoder(SAEConfig(d_in=32, d_sae=16, hook_name=HOOK))}
    assert count_settings(config, sae, _model(0)) == count_settings(config, sae, _model(0))
    assert count_settings(config, sae, _model(0)) != count_settings(config, sae, _model(1))


@pytest.mark.parametrize("numel", [1, 2, 63, 64, 65, 28_311_552, 2**25 + 3])
def test_fingerprint_positions_stay_inside_big_tensors(numel):
    """SmolLM2's embedding has 28,311,552 values: the sampled positions run from the first to the last, never past
    it (a float32 linspace rounded the last to 28,311,552)."""
    picks = sample_positions(numel, 64)
    n = min(64, numel)
    assert picks.tolist() == [i * (numel - 1) // max(n - 1, 1) for i in range(n)]
    assert picks[0] == 0 and picks[-1] == numel - 1 and len(set(picks.tolist())) == n
