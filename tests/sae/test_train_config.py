"""``TrainConfig`` refuses every harmful value when it is built, naming the field (and the file it came from) and
the range that would work, before any model loads."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mechscope.sae.train import TrainConfig, train_sae
from mechscope.settings import ConfigError, available_devices


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        ({"warmup_steps": -5}, "warmup_steps", "must be at least 0, got -5"),
        ({"l1_coefficient": -1.0}, "l1_coefficient", "must be at least 0, got -1.0"),
        ({"l0_coefficient": -1e-3}, "l0_coefficient", "must be at least 0, got -0.001"),
        ({"aux_k_coefficient": math.inf}, "aux_k_coefficient", "must be a finite number at least 0, got inf"),
        ({"checkpoint_every": -1}, "checkpoint_every", "must be at least 0, got -1"),
        ({"d_sae": 0}, "d_sae", "must be at least 1, got 0"),
        ({"aux_k": 0}, "aux_k", "must be at least 1, got 0"),
        ({"dead_tokens_threshold": -1}, "dead_tokens_threshold", "must be at least 1, got -1"),
        ({"shuffle_buffer": -1}, "shuffle_buffer", "must be at least 0, got -1"),
        ({"lr": 0.0}, "lr", "must be greater than 0, got 0.0"),
        ({"lr": -3e-4}, "lr", "must be greater than 0, got -0.0003"),
        ({"lr": math.nan}, "lr", "must be a finite number greater than 0, got nan"),
        ({"adam_beta1": 1.0}, "adam_beta1", "must be in [0, 1), got 1.0"),
        ({"adam_beta2": -0.1}, "adam_beta2", "must be in [0, 1), got -0.1"),
        ({"k": 0}, "k", "must be greater than 0, got 0"),
        ({"k": math.nan}, "k", "must be a finite number greater than 0, got nan"),
        ({"k": None}, "k", "is required for a topk SAE: give the latents per token"),
        ({"architecture": "batchtopk", "k": -2.0}, "k", "must be greater than 0, got -2.0"),
        ({"k": 40, "d_sae": 16}, "k", "is 40, more than d_sae=16: lower k or raise d_sae"),
        ({"architecture": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth", "must be greater than 0"),
        ({"jumprelu_init_threshold": -1.0}, "jumprelu_init_threshold", "must be at least 0, got -1.0"),
        ({"batchtopk_threshold_lr": 1.5}, "batchtopk_threshold_lr", "must be in [0, 1], got 1.5"),
        ({"out_dir": ""}, "out_dir", "is empty: give the directory the run writes to"),
        ({"device": "foo"}, "device", "'foo' is not a torch device: use one of cpu"),
        ({"device": ""}, "device", "'' is not a torch device: use one of cpu"),
        ({"architecture": "relu", "shard_latents": True}, "shard_latents", "topk SAEs only, not 'relu': set arch"),
    ],
)
def test_a_harmful_setting_is_refused_when_the_config_is_built(settings: dict, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**settings)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"TrainConfig.{field} ")
    assert message in str(caught.value)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "xpu"])
def test_a_device_this_machine_lacks_is_refused_with_the_ones_it_has(device: str) -> None:
    """Refused exactly when torch sees no such device here (on a machine that has it, it is accepted)."""
    kind = device.split(":")[0]
    present = getattr(torch, kind).device_count() > int(device.partition(":")[2] or 0)
    assert "cpu" in available_devices()
    if present:
        assert TrainConfig(device=device).device == device
        return
    with pytest.raises(ConfigError, match="is not available on this machine") as caught:
        TrainConfig(device=device)
    assert caught.value.field == "device"
    assert str(caught.value).endswith(f"use one of {', '.join(available_devices())}")


def test_a_bad_value_in_a_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    for text, message in [
        ("lr = nan\n", "TrainConfig.lr must be a finite number greater than 0, got nan"),
        ("warmup_steps = -10\n", "TrainConfig.warmup_steps must be at least 0, got -10"),
        ('device = "foo"\n', "TrainConfig.device 'foo' is not a torch device"),
        ("adam_beta2 = 1.0\n", "TrainConfig.adam_beta2 must be in [0, 1), got 1.0"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            TrainConfig.from_toml(path)
        assert str(caught.value).startswith(f"{path}: {message}")
    path.write_text("lr = 1e-3\n")
    with pytest.raises(ConfigError) as caught:  # a bad flag over a good file is the flag's fault: no file named
        TrainConfig.from_toml(path, lr=-1.0)
    assert str(caught.value) == "TrainConfig.lr must be greater than 0, got -1.0"


class _Rows:
    """A store of ``[batch, d_in]`` Gaussian rows at one hook (what ``train_sae`` reads)."""

    def __init__(self, hook: str, d_in: int) -> None:
        self.hook, self.d_in = hook, d_in

    def batches(
        self, batch_size: int, n_tokens: int | None = None, shuffle_buffer: int = 0, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        for _ in range((n_tokens or batch_size) // batch_size):
            yield {self.hook: torch.randn(batch_size, self.d_in)}


def test_k_wider_than_the_sae_it_implies_is_refused_before_training(tmp_path: Path) -> None:
    config = TrainConfig(k=40, expansion_factor=2, batch_size_tokens=8, n_tokens=16, out_dir=str(tmp_path / "run"))
    config.progress = False
    with pytest.raises(ConfigError) as caught:
        train_sae(config, store=_Rows(config.hook_name, d_in=16))
    assert caught.value.field == "k"
    assert str(caught.value) == (
        "TrainConfig.k is 40, more than the SAE's 32 latents (expansion_factor 2 * d_in 16): "
        "lower k, or raise expansion_factor or d_sae"
    )
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_explicit_d_sae_is_used_as_given(tmp_path: Path) -> None:
    config = TrainConfig(k=2, d_sae=5, batch_size_tokens=8, n_tokens=8, out_dir=str(tmp_path / "run"), progress=False)
    sae = train_sae(config, store=_Rows(config.hook_name, d_in=4))
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (4, 5)
