"""Every SAE file format: files written here in each format's own layout, loaded, and compared with that format's
encode/decode equations computed plainly from the raw tensors; and every way a file can be wrong."""

from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import mechscope.sae as sae_package
from mechscope.files import atomic_write
from mechscope.sae import SAE, SAEConfig, SAEFormatError, detect_format, load_sae
from mechscope.sae.formats import read_saelens, write_saelens
from mechscope.sae.io import load_openai, openai_state_dict_to_sae
from tests.sae_utils import random_weights, topk_reference

D_IN, D_SAE, K = 12, 48, 5
X = 1.5 * torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(7)) + 0.3


def check(sae: SAE, latents: torch.Tensor, recon: torch.Tensor) -> None:
    """``sae`` encodes X to ``latents`` and reconstructs it as ``recon``, by every route."""
    assert 0 < (latents > 0).sum() < latents.numel()
    assert_close(sae.encode(X), latents)
    assert_close(sae(X), recon)
    assert_close(sae.decode_sparse(*sae.encode_sparse(X), x=X), recon)


# ---- SAELens / mechscope --------------------------------------------------------------------------------------


def saelens_cfg(architecture: str, **fields) -> dict:
    """cfg.json as SAELens 6.54 writes it (``SAE.save_model``)."""
    return {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "model_name": "gpt2-small",
            "hook_name": "blocks.2.hook_resid_post",
        },
        "architecture": architecture,
        **fields,
    }


def write_dir(path: Path, cfg: dict, tensors: dict, weights_name: str = "sae_weights.safetensors") -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, path / weights_name)
    return path


def test_saelens_standard(tmp_path):
    w = random_weights(D_IN, D_SAE, 0)
    sae = load_sae(write_dir(tmp_path / "sae", saelens_cfg("standard"), w))
    assert (sae.cfg.architecture, sae.cfg.model_name, sae.cfg.hook_name) == (
        "relu",
        "gpt2-small",
        "blocks.2.hook_resid_post",
    )
    latents = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).clamp(min=0)
    check(sae, latents, latents @ w["W_dec"] + w["b_dec"])
    assert not sae.training


def test_saelens_topk(tmp_path):
    w = random_weights(D_IN, D_SAE, 1)
    sae = load_sae(write_dir(tmp_path / "sae", saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=False), w))
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", K)
    latents = topk_reference((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    check(sae, latents, latents @ w["W_dec"] + w["b_dec"])


def test_saelens_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    w = random_weights(D_IN, D_SAE, 2)
    sae = load_sae(write_dir(tmp_path / "sae", saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True), w))
    norms = w["W_dec"].norm(dim=-1)
    # SAELens: choose the top k of pre * |W_dec row|, decode latents / |W_dec row|
    latents = topk_reference(((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms, K)
    check(sae, latents, (latents / norms) @ w["W_dec"] + w["b_dec"])


def test_saelens_jumprelu_with_layer_norm(tmp_path):
    w = random_weights(D_IN, D_SAE, 3, threshold=True)
    sae = load_sae(write_dir(tmp_path / "sae", saelens_cfg("jumprelu", normalize_activations="layer_norm"), w))
    mu = X.mean(-1, keepdim=True)
    std = (((X - mu) ** 2).sum(-1, keepdim=True) / (D_IN - 1)).sqrt()
    pre = ((X - mu) / (std + 1e-5) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    latents = torch.where(pre > w["threshold"], pre.clamp(min=0), torch.zeros_like(pre))
    check(sae, latents, (latents @ w["W_dec"] + w["b_dec"]) * std + mu)


def test_saelens_batchtopk_inference_form(tmp_path):
    """SAELens saves a trained BatchTopK SAE as a jumprelu and records the training architecture and k."""
    w = random_weights(D_IN, D_SAE, 4)
    w["threshold"] = torch.full((D_SAE,), 0.25)
    cfg = saelens_cfg("jumprelu")
    cfg["metadata"].update(training_architecture="batchtopk", training_architecture_details={"k": 6.0})
    sae = load_sae(write_dir(tmp_path / "sae", cfg, w))
    assert (sae.cfg.architecture, sae.cfg.k) == ("batchtopk", 6.0)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    latents = torch.where(pre > 0.25, pre, torch.zeros_like(pre))
    check(sae, latents, latents @ w["W_dec"] + w["b_dec"])


def test_saelens_before_6_flat_config(tmp_path):
    w = random_weights(D_IN, D_SAE, 5)
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cuda",
        "model_name": "pythia-70m-deduped",
        "hook_point": "blocks.4.hook_resid_post",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "sae_lens_training_version": "3.13.0",
    }
    sae = load_sae(write_dir(tmp_path / "sae", cfg, {**w, "scaling_factor": torch.ones(D_SAE)}))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name) == ("topk", K, "blocks.4.hook_resid_post")
    assert sae.cfg.device == "cpu"
    latents = topk_reference((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    check(sae, latents, latents @ w["W_dec"] + w["b_dec"])


def test_saelens_unscaled_expected_average_warns(tmp_path):
    w = random_weights(D_IN, D_SAE, 6)
    path = write_dir(tmp_path / "sae", saelens_cfg("standard", normalize_activations="expected_average_only_in"), w)
    with pytest.warns(UserWarning, match="stores no scaling factor"):
        sae = load_sae(path)
    assert sae.cfg.normalize_activations == "none"


ROUND_TRIPS = {
    "relu": SAEConfig(D_IN, D_SAE, model_name="gpt2", hook_name="blocks.1.hook_resid_pre"),
    "topk_layer_norm": SAEConfig(D_IN, D_SAE, "topk", K, normalize_activations="layer_norm"),
    "batchtopk": SAEConfig(D_IN, D_SAE, "batchtopk", 3.5),
    "jumprelu_norm_rescale": SAEConfig(
        D_IN, D_SAE, "jumprelu", apply_b_dec_to_input=False, normalize_activations="constant_norm_rescale"
    ),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_save_writes_the_saelens_layout_and_loads_back(tmp_path, name):
    cfg = ROUND_TRIPS[name]
    original = SAE(cfg)
    original.load_state_dict(random_weights(D_IN, D_SAE, 8, threshold=cfg.architecture in ("jumprelu", "batchtopk")))
    original.eval()
    original.save(tmp_path / name)

    written = json.loads((tmp_path / name / "cfg.json").read_text())
    saelens_fields = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations"}
    saelens_fields |= {"reshape_activations", "metadata", "architecture"}
    if cfg.architecture == "topk":
        saelens_fields |= {"k", "rescale_acts_by_decoder_norm"}
    assert set(written) == saelens_fields
    assert written["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(
        cfg.architecture, cfg.architecture
    )
    assert written["metadata"]["sae_lens_version"] == "6.0.0"
    assert (written["metadata"]["model_name"], written["metadata"]["hook_name"]) == (cfg.model_name, cfg.hook_name)
    stored = load_file(tmp_path / name / "sae_weights.safetensors")
    assert all(torch.equal(stored[key], value) for key, value in original.state_dict().items())
    assert len(stored) == len(original.state_dict())

    loaded = SAE.load(tmp_path / name)
    assert loaded.cfg == original.cfg
    assert_close(loaded.encode(X), original.encode(X), rtol=0, atol=0)
    assert_close(loaded(X), original(X), rtol=0, atol=0)


def test_save_folds_a_fixed_scaling_factor(tmp_path):
    original = SAE(SAEConfig(D_IN, D_SAE, normalize_activations="expected_average_only_in", scaling_factor=2.5))
    w = random_weights(D_IN, D_SAE, 9)
    original.load_state_dict(w)
    original.save(tmp_path / "sae")
    stored = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert_close(stored["W_enc"], w["W_enc"] * 2.5)
    assert_close(stored["W_dec"], w["W_dec"] / 2.5)
    assert_close(stored["b_dec"], w["b_dec"] / 2.5)
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg == replace(original.cfg, normalize_activations="none", scaling_factor=None)
    latents = ((2.5 * X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).clamp(min=0)
    check(loaded, latents, (latents @ w["W_dec"] + w["b_dec"]) / 2.5)


def test_save_refuses_to_overwrite_a_different_sae(tmp_path):
    first, second = (SAE(SAEConfig(D_IN, D_SAE)) for _ in range(2))
    path = first.save(tmp_path / "sae")
    before = (path / "sae_weights.safetensors").read_bytes()
    first.save(path)  # the same SAE again: nothing to do
    with pytest.raises(
        FileExistsError, match=r"holds a different SAE \(architecture 'standard', d_in=12.*overwrite=True"
    ):
        second.save(path)
    assert (path / "sae_weights.safetensors").read_bytes() == before
    second.save(path, overwrite=True)
    assert torch.equal(SAE.load(path).W_dec, second.W_dec)
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        first.save(tmp_path / "file")


@pytest.mark.parametrize("failing", ["sae_weights.safetensors", "cfg.json"])
def test_failed_save_leaves_nothing_half_written(tmp_path, failing):
    old = SAE(SAEConfig(D_IN, D_SAE))
    old.save(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}

    def disk_full(path: Path, write) -> Path:
        """``atomic_write``, except that the ``failing`` file runs out of space half-way."""
        if path.name != failing:
            return atomic_write(path, write)

        def partial(tmp: Path) -> None:
            tmp.write_bytes(b"partial")
            raise OSError("disk full")

        return atomic_write(path, partial)

    new = SAE(SAEConfig(D_IN, D_SAE))
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "new", write_file=disk_full)
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "old", overwrite=True, write_file=disk_full)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


# ---- OpenAI sparse_autoencoder / Transformer Debugger ---------------------------------------------------------


def openai_state(seed: int, activation: str) -> dict:
    """A state dict laid out as openai/sparse_autoencoder's ``Autoencoder.state_dict()`` returns it."""
    w = random_weights(D_IN, D_SAE, seed)
    return {
        "pre_bias": w["b_dec"],
        "latent_bias": w["b_enc"],
        "encoder.weight": w["W_enc"].T.contiguous(),
        "decoder.weight": w["W_dec"].T.contiguous(),
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "activation": activation,
        "activation_state_dict": {"k": K, "postact_fn": "ReLU"} if activation == "TopK" else {},
    }


def test_openai_relu(tmp_path):
    state = openai_state(10, "ReLU")
    torch.save(state, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    assert (sae.cfg.architecture, sae.cfg.normalize_activations) == ("relu", "none")
    latents = ((X - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]).clamp(min=0)
    check(sae, latents, latents @ state["decoder.weight"].T + state["pre_bias"])


def test_openai_topk_normalises_each_token(tmp_path):
    state = openai_state(11, "TopK")
    torch.save(state, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.normalize_activations) == ("topk", K, "layer_norm")
    mu = X.mean(-1, keepdim=True)
    std = (((X - mu) ** 2).sum(-1, keepdim=True) / (D_IN - 1)).sqrt()
    x_n = (X - mu) / (std + 1e-5)
    latents = topk_reference((x_n - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"], K)
    check(sae, latents, (latents @ state["decoder.weight"].T + state["pre_bias"]) * std + mu)
    assert load_openai(tmp_path / "ae.pt", layer_norm=False).cfg.normalize_activations == "none"


def test_openai_tied_decoder():
    state = openai_state(12, "ReLU")
    del state["decoder.weight"]
    state["decoder.linear.weight"] = state["encoder.weight"]
    sae = openai_state_dict_to_sae(state)
    latents = ((X - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]).clamp(min=0)
    check(sae, latents, latents @ state["encoder.weight"] + state["pre_bias"])


class Payload:
    """Anything that is not a tensor or plain value: a pickle that could run code when loaded."""


def test_openai_file_is_never_unpickled(tmp_path):
    torch.save({**openai_state(13, "ReLU"), "extra": Payload()}, tmp_path / "ae.pt")
    with pytest.raises(SAEFormatError, match=r"ae\.pt holds objects other than tensors.*never unpickles"):
        load_sae(tmp_path / "ae.pt")


def test_openai_bad_files(tmp_path):
    torch.save(openai_state(14, "ReLU"), tmp_path / "ae.pt")
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=r"cut\.pt is a truncated or corrupt zip archive"):
        load_sae(tmp_path / "cut.pt")
    (tmp_path / "cut_body.pt").write_bytes(data[:-100] + b"\0" * 100)
    with pytest.raises(SAEFormatError, match="truncated"):
        load_openai(tmp_path / "cut_body.pt")

    wrong = openai_state(14, "ReLU")
    wrong["decoder.weight"] = wrong["decoder.weight"].T
    with pytest.raises(SAEFormatError, match=r"decoder.weight has shape \[48, 12\], expected \[12, 48\] \(encoder"):
        openai_state_dict_to_sae(wrong)
    with pytest.raises(SAEFormatError, match=r"missing \['pre_bias'\]"):
        openai_state_dict_to_sae({k: v for k, v in openai_state(14, "ReLU").items() if k != "pre_bias"})
    with pytest.raises(SAEFormatError, match="activation 'Identity' is not supported"):
        openai_state_dict_to_sae(openai_state(14, "Identity"))
    with pytest.raises(SAEFormatError, match=r"unexpected entries \['step'\]"):
        openai_state_dict_to_sae({**openai_state(14, "ReLU"), "step": torch.tensor(3)})


# ---- Gemma Scope ----------------------------------------------------------------------------------------------


def write_gemma_scope(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    w = random_weights(D_IN, D_SAE, seed, threshold=True)
    np.savez(folder / "params.npz", **{name: value.numpy() for name, value in w.items()})
    return w


def test_gemma_scope(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    w = write_gemma_scope(folder, 15)
    for path in (folder, folder / "params.npz"):
        sae = load_sae(path)
        assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("jumprelu", False)
        assert (sae.cfg.model_name, sae.cfg.hook_name) == ("google/gemma-2-2b", "blocks.20.hook_resid_post")
        pre = X @ w["W_enc"] + w["b_enc"]  # Gemma Scope does not subtract b_dec
        latents = (pre > w["threshold"]) * pre.clamp(min=0)
        check(sae, latents, latents @ w["W_dec"] + w["b_dec"])


def test_gemma_scope_bad_files(tmp_path):
    write_gemma_scope(tmp_path / "plain", 16)
    np.savez(tmp_path / "objects.npz", W_enc=np.array([{"code": 1}], dtype=object))
    with pytest.raises(SAEFormatError, match=r"objects\.npz is truncated or not a plain npz archive"):
        load_sae(tmp_path / "objects.npz")
    data = (tmp_path / "plain" / "params.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=r"cut\.npz is a truncated or corrupt zip archive"):
        load_sae(tmp_path / "cut.npz")
    w = random_weights(D_IN, D_SAE, 16, threshold=True)
    np.savez(tmp_path / "short.npz", **{k: v.numpy() for k, v in w.items()}, extra=np.zeros(1))
    with pytest.raises(SAEFormatError, match=r"short\.npz: unexpected entries \['extra'\]"):
        load_sae(tmp_path / "short.npz")
    w["threshold"] = w["threshold"][:-1]
    np.savez(tmp_path / "short.npz", **{k: v.numpy() for k, v in w.items()})
    with pytest.raises(SAEFormatError, match=r"threshold has shape \[47\], expected \[48\] \(W_enc gives d_in=12"):
        load_sae(tmp_path / "short.npz")


# ---- EleutherAI sparsify --------------------------------------------------------------------------------------

SPARSIFY_CFG = {  # as sparsify 1.3.3's SparseCoder.save_to_disk writes it
    "activation": "topk",
    "expansion_factor": 4,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": K,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
    "d_in": D_IN,
}


def sparsify_tensors(seed: int) -> dict[str, torch.Tensor]:
    w = random_weights(D_IN, D_SAE, seed)
    return {
        "encoder.weight": w["W_enc"].T.contiguous(),
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }


def test_sparsify(tmp_path):
    t = sparsify_tensors(17)
    path = write_dir(tmp_path / "run" / "layers.3", SPARSIFY_CFG, t, "sae.safetensors")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    sae = load_sae(path)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_sae) == ("topk", K, D_SAE)  # 4 x d_in
    assert (sae.cfg.model_name, sae.cfg.hook_name) == ("EleutherAI/pythia-70m", "layers.3.hook_result_post")
    latents = topk_reference(((X - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).clamp(min=0), K)
    check(sae, latents, latents @ t["W_dec"] + t["b_dec"])


def test_sparsify_dtype_and_refusals(tmp_path):
    t = {name: value.bfloat16() for name, value in sparsify_tensors(18).items()}
    path = write_dir(tmp_path / "custom", SPARSIFY_CFG, t, "sae.safetensors")
    assert load_sae(path).cfg.dtype == "bfloat16"
    sae = load_sae(path / "sae.safetensors", dtype="float32")
    assert (sae.cfg.dtype, sae.cfg.hook_name, sae.cfg.model_name) == ("float32", None, None)
    assert torch.equal(sae.W_dec, t["W_dec"].float())
    write_dir(tmp_path / "transcoder", {**SPARSIFY_CFG, "transcode": True}, t, "sae.safetensors")
    with pytest.raises(SAEFormatError, match="transcode=true are not supported"):
        load_sae(tmp_path / "transcoder")


# ---- detection and damaged files ------------------------------------------------------------------------------


def test_detect_format(tmp_path):
    write_dir(tmp_path / "saelens", saelens_cfg("standard"), random_weights(D_IN, D_SAE, 19))
    write_dir(tmp_path / "sparsify", SPARSIFY_CFG, sparsify_tensors(19), "sae.safetensors")
    write_gemma_scope(tmp_path / "gemma", 19)
    torch.save(openai_state(19, "ReLU"), tmp_path / "ae.pt")
    assert detect_format(tmp_path / "saelens") == detect_format(tmp_path / "saelens" / "cfg.json") == "saelens"
    assert detect_format(tmp_path / "sparsify") == "sparsify"
    assert detect_format(tmp_path / "gemma") == detect_format(tmp_path / "gemma" / "params.npz") == "gemma_scope"
    assert detect_format(tmp_path / "ae.pt") == "openai"
    assert load_sae(tmp_path / "saelens" / "cfg.json").cfg.hook_name == "blocks.2.hook_resid_post"


def test_paths_that_hold_no_sae(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(SAEFormatError, match=r"empty holds no SAE \(found \['notes.txt'\]\); expected a directory"):
        load_sae(tmp_path / "empty")
    (tmp_path / "text.bin").write_text("hello world")
    with pytest.raises(SAEFormatError, match=r"text\.bin is not an SAE file \(it starts with b'hello wo'\)"):
        load_sae(tmp_path / "text.bin")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.md", "hi")
    with pytest.raises(SAEFormatError, match=r"zip archive of \['readme.md'\], neither an npz nor a torch file"):
        load_sae(tmp_path / "other.zip")


def test_damaged_saelens_directories(tmp_path):
    w = random_weights(D_IN, D_SAE, 20, threshold=True)
    path = write_dir(tmp_path / "sae", saelens_cfg("standard"), w)
    weights = path / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors is truncated or not a safetensors file"):
        load_sae(path)

    save_file({**w, "W_enc": w["W_enc"][:, :-1].contiguous()}, weights)
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: unexpected entries \['threshold'\]"):
        load_sae(path)
    del w["threshold"]
    save_file({**w, "W_enc": w["W_enc"][:, :-1].contiguous()}, weights)
    message = (
        r"sae_weights\.safetensors: W_enc has shape \[12, 47\], expected \[12, 48\] "
        r"\(cfg\.json gives d_in=12, d_sae=48, architecture 'relu'\)"
    )
    with pytest.raises(SAEFormatError, match=message):
        load_sae(path)
    save_file(w, weights)
    (path / "cfg.json").write_text(json.dumps(saelens_cfg("jumprelu")))
    with pytest.raises(SAEFormatError, match=r"missing \['threshold'\]"):
        load_sae(path)

    for cfg, message in [
        ('{"d_in": 12, "d_sae"', r"cfg\.json is not valid JSON"),
        (json.dumps({**saelens_cfg("standard"), "d_sae": None}), r"cfg\.json: SAEConfig\.d_sae must be a positive"),
        (json.dumps({k: v for k, v in saelens_cfg("standard").items() if k != "d_in"}), "has no 'd_in' field"),
        (json.dumps(saelens_cfg("gated")), "architecture 'gated' .* is not supported"),
        (json.dumps(saelens_cfg("standard", normalize_activations="covariance_whitening")), "not supported"),
    ]:
        (path / "cfg.json").write_text(cfg)
        with pytest.raises(SAEFormatError, match=message):
            load_sae(path)
    (path / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match=r"cfg\.json is missing"):
        load_sae(path)


# ---- the module graph -----------------------------------------------------------------------------------------


def test_readers_return_config_and_tensors_and_the_writer_takes_them(tmp_path):
    cfg = SAEConfig(D_IN, D_SAE, "jumprelu", hook_name="blocks.1.hook_resid_pre")
    w = random_weights(D_IN, D_SAE, 21, threshold=True)
    assert write_saelens(cfg, w, tmp_path / "sae") == tmp_path / "sae"
    read_cfg, tensors = read_saelens(tmp_path / "sae")
    assert read_cfg == cfg and sorted(tensors) == sorted(w)
    assert all(torch.equal(tensors[name], value) for name, value in w.items())
    sae = SAE.from_tensors(read_cfg, tensors)
    assert sae.cfg == cfg and torch.equal(sae.threshold, w["threshold"])
    with pytest.raises(RuntimeError, match="threshold"):
        SAE.from_tensors(cfg, {k: v for k, v in w.items() if k != "threshold"})


def _imports(module: Path) -> list[tuple[str, bool]]:
    """The mechscope modules ``module`` imports, each with whether the import is at the top level."""
    tree = ast.parse(module.read_text())
    # a package's ``if TYPE_CHECKING:`` imports are its static re-exports (the names load lazily: mechscope._lazy)
    checking = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    top = {id(node) for node in [*tree.body, *(m for n in checking for m in n.body)]}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mechscope"):
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names if alias.name.startswith("mechscope")]
    return found


def test_sae_modules_import_one_way_at_the_top_level():
    """formats never imports the model (the model builds itself from what formats reads); kernels only its loops; no
    import in sae/ is hidden inside a function, and the modules of mechscope.sae import each other without a cycle."""
    package = Path(sae_package.__file__).parent
    graph = {}
    for module in sorted(package.glob("*.py")):
        imports = _imports(module)
        assert all(top for _, top in imports), f"{module.name} imports inside a function: {imports}"
        graph[module.stem] = {name.rsplit(".", 1)[-1] for name, _ in imports if name.startswith("mechscope.sae.")}
    assert graph["formats"] <= {"config"}
    assert graph["kernels"] == {"loops"}  # its CPU loops
    assert graph["loops"] == graph["latents"] == graph["config"] == set()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())
