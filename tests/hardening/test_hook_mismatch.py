"""Issue 13: an SAE is not run at a hook other than the one it was trained on (widths can match by chance) unless the
user says so explicitly; dashboards refuse attention maps naming the hooks they support."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from mechscope.cooccurrence import CoocConfig, CountingConfig
from mechscope.cooccurrence.pipeline import load_saes
from mechscope.dashboards.pipeline import DashboardsConfig, run_dashboards
from mechscope.sae import SAEConfig, SparseAutoencoder
from mechscope.sae.evaluate import evaluate_sae
from mechscope.sae.splice import splice_sae

TRAINED, OTHER = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
BOTH = (
    f"trained on {re.escape(repr(TRAINED))} but is asked to run at {re.escape(repr(OTHER))}.*allow_hook_mismatch=True"
)


def _sae(d_in: int, hook_name: str | None = TRAINED) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=32, hook_name=hook_name))


def test_splice_refuses_another_hook_of_the_same_width_unless_allowed(llama):
    sae = _sae(llama.cfg.d_model)
    with pytest.raises(ValueError, match=BOTH):
        splice_sae(llama, sae, hook_name=OTHER)
    assert splice_sae(llama, sae, hook_name=OTHER, allow_hook_mismatch=True).fwd_hooks[0][0] == OTHER
    assert splice_sae(llama, sae).fwd_hooks[0][0] == TRAINED
    assert splice_sae(llama, _sae(llama.cfg.d_model, None), hook_name=OTHER).fwd_hooks[0][0] == OTHER  # nothing known


def test_cooccurrence_refuses_another_hook_unless_the_config_allows_it(llama, tmp_path):
    sae = _sae(llama.cfg.d_model)

    def config(**counting) -> CoocConfig:
        return CoocConfig(CountingConfig(model="random-llama", **counting), results_dir=str(tmp_path))

    with pytest.raises(ValueError, match=BOTH):
        load_saes(config(hook_names=[OTHER]), llama, sae)
    with pytest.raises(ValueError, match=BOTH):
        load_saes(config(), llama, {OTHER: sae})
    assert load_saes(config(hook_names=[OTHER], allow_hook_mismatch=True), llama, sae) == {OTHER: sae}
    assert load_saes(config(), llama, sae) == {TRAINED: sae}


def test_dashboards_refuse_another_hook_and_attention_maps(llama, tmp_path):
    sae = _sae(llama.cfg.d_model)
    base = dict(sae="unused", model="random-llama", out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match=BOTH):
        run_dashboards(DashboardsConfig(**base, hook_name=OTHER), model=llama, sae=sae)
    pattern = "blocks.0.attn.hook_pattern"
    with pytest.raises(ValueError, match=r"hook_pattern'.* is an attention map .*Dashboards support .*hook_resid_pre"):
        run_dashboards(DashboardsConfig(**base), model=llama, sae=_sae(1, pattern))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_evaluate_sae_refuses_another_hook_unless_allowed(llama):
    """Before, ``evaluate_sae(model, sae, OTHER, ...)`` gave figures of the SAE at a hook it was not trained on."""
    sae = _sae(llama.cfg.d_model)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=BOTH):
        evaluate_sae(llama, sae, OTHER, tokens, progress=False)
    allowed = evaluate_sae(llama, sae, OTHER, tokens, progress=False, allow_hook_mismatch=True).to_dict()
    moved = SparseAutoencoder(dataclasses.replace(sae.cfg, hook_name=OTHER))  # the same weights, "trained" at OTHER
    moved.load_state_dict(sae.state_dict())
    assert allowed == evaluate_sae(llama, moved, tokens=tokens, progress=False).to_dict()
    assert evaluate_sae(llama, sae, TRAINED, tokens, progress=False).to_dict() != allowed
