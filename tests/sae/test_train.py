"""SAE training: losses and estimators against hand computations, exact resume, synthetic recovery, store and CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from itertools import product
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from mechscope import HookedAutoConfig, HookedModel
from mechscope.apps.cli import build_parser, main
from mechscope.data import ActivationStore
from mechscope.files import atomic_write
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.sae import SAE, SAEConfig
from mechscope.sae.kernels import SparseDecode
from mechscope.sae.train import (
    TRAINER_JSON,
    TRAINER_TENSORS,
    TrainConfig,
    Trainer,
    current_names,
    find_checkpoint,
    geometric_median,
    lr_at,
    train_sae,
)
from mechscope.settings import DeprecatedSetting, flag_values

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These SAEs are tiny: one thread avoids thread start-up costs that dominate on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SparseDictionaryData:
    """Ground truth: ``n_dirs`` unit directions in ``d`` dims; each row a nonneg combination of ``active`` of them."""

    def __init__(self, n_dirs: int = 64, d: int = 32, active: int = 3, n_rows: int = 256 * 400, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=-1)  # [n_dirs, d]
        chosen = torch.rand(n_rows, n_dirs, generator=g).topk(active, dim=-1).indices
        coef = torch.zeros(n_rows, n_dirs).scatter_(1, chosen, 0.5 + torch.rand(n_rows, active, generator=g))
        self.rows = coef @ self.dirs  # [n_rows, d]

    def batches(
        self, batch_size: int, n_tokens: int | None = None, shuffle_buffer: int = 0, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        for start in range(0, min(n_tokens or len(self.rows), len(self.rows)), batch_size):
            yield {"x": self.rows[start : start + batch_size]}


@pytest.fixture(scope="module")
def synthetic() -> SparseDictionaryData:
    return SparseDictionaryData()


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    settings = {
        "model": "synthetic",
        "hook_name": "x",
        "n_tokens": 256 * 400,
        "batch_size_tokens": 256,
        "architecture": "topk",
        "d_sae": 64,
        "k": 3,
        "lr": 1e-2,
        "warmup_steps": 20,
        "dead_tokens_threshold": 256 * 50,
        "log_every": 50,
        "shuffle_buffer": 0,
        "progress": False,
        "out_dir": str(tmp_path / "run"),
    }
    return TrainConfig(**{**settings, **overrides})


# ---- pieces ------------------------------------------------------------------------------------------------------


def test_geometric_median_by_hand() -> None:
    triangle = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3**0.5]])  # equilateral: the Fermat point is the centroid
    torch.testing.assert_close(geometric_median(triangle), triangle.double().mean(0))
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])  # on a line: the median
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-3, rtol=0)


def test_geometric_median_beats_the_mean_and_a_brute_force_grid() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(60, 2, generator=g), 40 + 5 * torch.randn(8, 2, generator=g)])  # with outliers

    def cost(p: Tensor) -> Tensor:  # sum of distances from each candidate [..., 2] to all points
        return (points.double() - p[..., None, :]).norm(dim=-1).sum(-1)

    axis = torch.linspace(-3, 8, 1101, dtype=torch.float64)  # 0.01 spacing
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    best = grid[cost(grid).argmin()]
    median = geometric_median(points)
    assert cost(median) <= cost(best) + 1e-9
    assert (median - best).norm() < 0.02
    assert cost(median) < 0.8 * cost(points.double().mean(0))


def test_learning_rate_warms_up_and_decays_linearly_to_zero(tmp_path: Path) -> None:
    config = _config(tmp_path, n_tokens=100 * 256, warmup_steps=10, decay_fraction=0.2, lr=1.0)
    expected = [min(1, (s + 1) / 10) * min(1, (100 - s) / 20) for s in range(100)]
    assert [lr_at(config, s) for s in range(100)] == pytest.approx(expected)
    assert lr_at(config, 0) == pytest.approx(0.1) and lr_at(config, 50) == 1.0 and lr_at(config, 99) == 0.05


def test_relu_penalty_is_l1_weighted_by_decoder_norms(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(16, 1) + 0.5)  # rows of different norms
        sae.b_enc.normal_()
    x = torch.randn(5, 8)
    trainer = Trainer(_config(tmp_path, architecture="relu", l1_coefficient=0.3), sae)
    terms, _, _ = trainer.losses(x)
    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    expected_l1 = 0.3 * sum(z[t, i] * sae.W_dec[i].norm() for t, i in product(range(5), range(16))) / 5
    torch.testing.assert_close(terms["l1"], expected_l1)
    torch.testing.assert_close(terms["mse"], ((x - z @ sae.W_dec - sae.b_dec) ** 2).sum() / 5)


def test_aux_k_reconstructs_the_error_from_the_top_dead_latents(tmp_path: Path) -> None:
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
    x = torch.randn(4, 8)
    trainer = Trainer(_config(tmp_path, k=2, aux_k=3, aux_k_coefficient=0.5, dead_tokens_threshold=100), sae)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 5, 9, 12]] = True
    trainer.tokens_since_fired[dead] = 100
    terms, _, recon = trainer.losses(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = 0.0
    for t in range(4):
        dead_ids = sorted(dead.nonzero().flatten().tolist(), key=lambda i: -pre[t, i].item())[:3]
        e_hat = sum(max(pre[t, i].item(), 0.0) * sae.W_dec[i] for i in dead_ids)
        expected += ((x[t] - recon[t]) - e_hat).pow(2).sum() / 4
    torch.testing.assert_close(terms["aux"], 0.5 * expected)
    trainer.tokens_since_fired.zero_()
    assert "aux" not in trainer.losses(x)[0]  # no dead latents, no AuxK term


def test_sparse_topk_step_matches_a_dense_reference(tmp_path: Path) -> None:
    """The TopK losses (sparse decode, gradients through the selected latents only) equal the plain dense ones."""
    torch.manual_seed(2)
    d_in, d_sae, k, aux_k = 6, 24, 3, 5
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)).double()
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_()
    x = torch.randn(16, d_in, dtype=torch.float64)
    trainer = Trainer(_config(tmp_path, k=k, d_sae=d_sae, aux_k=aux_k, aux_k_coefficient=0.25), sae)
    dead = torch.arange(d_sae) % 2 == 0
    trainer.tokens_since_fired[dead] = trainer.config.dead_tokens_threshold
    terms, latents, recon = trainer.losses(x)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    grads = torch.autograd.grad(terms["mse"] + terms["aux"], params)

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # the reference: dense latents and matrix products throughout
    values, indices = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    error = x - (z @ sae.W_dec + sae.b_dec)
    aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
    mse = error.pow(2).sum(-1).mean()
    aux = 0.25 * (error.detach() - z_aux @ sae.W_dec).pow(2).sum(-1).mean()
    expected_grads = torch.autograd.grad(mse + aux, params)

    assert (indices[..., None] == aux_indices[:, None, :]).any(), "no latent in both TopK and AuxK: a weak test"
    torch.testing.assert_close(recon, x - error)
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["aux"], aux)
    dense_latents = torch.zeros_like(pre).scatter(-1, latents.indices, latents.values)
    torch.testing.assert_close(dense_latents, z)
    for name, got, want in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparse_decode_matches_the_dense_product(dtype: torch.dtype) -> None:
    """``SparseDecode`` (TopK's decoder, in training and in ``sae(x)``): value and gradients of ``dense @ W``."""
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 5, (9, 4), generator=g)  # repeats within rows add up
    values = torch.randn(9, 4, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(12, 7, generator=g, dtype=dtype, requires_grad=True)
    out_grad = torch.randn(9, 7, generator=g, dtype=dtype)
    out = SparseDecode.apply(indices, values, weight)
    grads = torch.autograd.grad(out, [values, weight], out_grad)
    dense = torch.zeros(9, 12, dtype=dtype).scatter_add(-1, indices, values)
    expected = dense @ weight
    expected_grads = torch.autograd.grad(expected, [values, weight], out_grad)
    tolerance = {"atol": 0.1, "rtol": 0.02} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tolerance)


def test_jumprelu_threshold_gradient_is_the_rectangle_ste(tmp_path: Path) -> None:
    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu"))
    x = torch.randn(64, 8)
    eps, coef = 0.2, 0.7
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 0.5)
    trainer = Trainer(_config(tmp_path, architecture="jumprelu", jumprelu_bandwidth=eps, l0_coefficient=coef), sae)
    terms, latents, _ = trainer.losses(x)
    (terms["mse"] + terms["l0"]).backward()
    with torch.no_grad():
        theta = sae.threshold
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        err = x - latents @ sae.W_dec - sae.b_dec
        d_latents = -2 * err @ sae.W_dec.T / 64  # d mse / d latents
        in_window = ((pre - theta).abs() < eps / 2).double()
        expected = (d_latents * -(theta / eps) * in_window).sum(0) + coef * (-(1 / eps) * in_window).sum(0) / 64
        assert torch.equal(latents, torch.where(pre > theta, pre, torch.zeros_like(pre)))
        torch.testing.assert_close(terms["l0"], coef * (pre > theta).sum() / 64)
    torch.testing.assert_close(sae.threshold.grad, expected.float())
    assert (sae.threshold.grad != 0).sum() > 4


def test_batchtopk_threshold_is_a_running_mean_of_the_smallest_selected_activation(tmp_path: Path) -> None:
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=2.5)).train()
    trainer = Trainer(_config(tmp_path, architecture="batchtopk", k=2.5, batchtopk_threshold_lr=0.1), sae)
    expected = None
    for _ in range(3):
        x = torch.randn(32, 8)
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            selected = pre.relu().flatten().sort(descending=True).values[: int(2.5 * 32)]
            smallest = selected[selected > 0].min()
        expected = smallest if expected is None else 0.9 * expected + 0.1 * smallest
        metrics = trainer.train_step(x)
        assert metrics["l0"] == pytest.approx(2.5)
        torch.testing.assert_close(sae.threshold, expected.expand(16))


# ---- whole runs -----------------------------------------------------------------------------------------------


def test_topk_recovers_a_known_sparse_dictionary(synthetic: SparseDictionaryData, tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, progress=True)
    sae = train_sae(config, store=synthetic)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "400/400" in bar and "l0=3.0" in bar and "fvu=0." in bar and "dead=" in bar
    max_cos = (synthetic.dirs @ sae.W_dec.detach().T).max(dim=1).values  # best latent for each true direction
    print(f"mean max cosine {max_cos.mean():.4f}, recovered above 0.9: {(max_cos > 0.9).float().mean():.0%}")
    assert max_cos.mean() > 0.9  # 0.967 on this data and seed
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.k) == ("synthetic", "x", 3)

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(50, 401, 50))
    assert all(m["l0"] == 3.0 for m in lines)
    assert lines[-1]["fvu"] < 0.5 * lines[0]["fvu"]
    x = synthetic.rows[-256:]  # the last batch, which the final logged step trained on
    saved = SAE.load(tmp_path / "run" / "sae")
    assert torch.equal(saved.W_dec, sae.W_dec) and saved.cfg.hook_name == "x"
    with torch.no_grad():
        fvu = ((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu.item() == pytest.approx(lines[-1]["fvu"], rel=0.1)


def test_jumprelu_thresholds_move_and_l0_follows_the_sparsity_coefficient(
    synthetic: SparseDictionaryData, tmp_path: Path
) -> None:
    l0s = []
    for coef in (1e-4, 3e-2):
        config = _config(
            tmp_path,
            architecture="jumprelu",
            n_tokens=256 * 200,
            l0_coefficient=coef,
            jumprelu_bandwidth=0.05,
            jumprelu_init_threshold=0.05,
            out_dir=str(tmp_path / f"jump_{coef}"),
        )
        sae = train_sae(config, store=synthetic)
        assert (sae.threshold - 0.05).abs().max() > 0.02  # thresholds moved away from their initial value
        print(f"coefficient {coef}: mean threshold {sae.threshold.mean():.4f}")
        with torch.no_grad():
            l0s.append((sae.encode(synthetic.rows[:2048]) > 0).sum(-1).float().mean().item())
    print(f"jumprelu L0 at l0_coefficient 1e-4 / 3e-2: {l0s[0]:.2f} / {l0s[1]:.2f}")
    assert l0s[1] < 0.7 * l0s[0]


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "relu"])
def test_resume_equals_an_uninterrupted_run(synthetic: SparseDictionaryData, tmp_path: Path, architecture: str) -> None:
    overrides = {"architecture": architecture, "n_tokens": 256 * 40, "dead_tokens_threshold": 256 * 5}
    straight = train_sae(_config(tmp_path, out_dir=str(tmp_path / "a"), **overrides), store=synthetic)
    half = train_sae(_config(tmp_path, out_dir=str(tmp_path / "b"), **overrides), store=synthetic, stop_after=20)
    assert not (tmp_path / "b" / "sae").exists()  # a stopped run leaves a checkpoint, not a result
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint").iterdir()) == [
        "sae",
        "trainer.json",
        "trainer.safetensors",
    ]
    assert not torch.equal(half.W_dec, straight.W_dec)
    with pytest.raises(FileExistsError, match="resume=True"):
        train_sae(_config(tmp_path, out_dir=str(tmp_path / "b"), **overrides), store=synthetic)
    with pytest.raises(ValueError, match=r"other settings \{'lr': \(0.01, 0.02\)\}"):
        train_sae(_config(tmp_path, out_dir=str(tmp_path / "b"), resume=True, lr=0.02, **overrides), store=synthetic)
    resumed = train_sae(_config(tmp_path, out_dir=str(tmp_path / "b"), resume=True, **overrides), store=synthetic)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in "ab"]
    assert metrics[0] == metrics[1]


def test_a_kill_while_writing_a_checkpoint_keeps_the_last_one_and_resume_is_exact(
    synthetic: SparseDictionaryData, tmp_path: Path
) -> None:
    overrides = {"n_tokens": 256 * 40, "dead_tokens_threshold": 256 * 5, "checkpoint_every": 10}
    straight = train_sae(_config(tmp_path, out_dir=str(tmp_path / "a"), **overrides), store=synthetic)
    adam_writes = []

    def killed_in_the_second_checkpoint(path: Path, write) -> Path:
        """``atomic_write``, except that the process 'dies' half-way through the second checkpoint's Adam state."""
        if path.name == TRAINER_TENSORS:
            adam_writes.append(path)
            if len(adam_writes) == 2:

                def half_then_killed(tmp: Path) -> None:
                    tmp.write_bytes(b"half a safetensors file")
                    raise KeyboardInterrupt

                return atomic_write(path, half_then_killed)
        return atomic_write(path, write)

    config = _config(tmp_path, out_dir=str(tmp_path / "b"), **overrides)
    with pytest.raises(KeyboardInterrupt):
        train_sae(config, store=synthetic, write_file=killed_in_the_second_checkpoint)
    checkpoint = find_checkpoint(tmp_path / "b")
    assert checkpoint == tmp_path / "b" / "checkpoint"
    assert json.loads((checkpoint / TRAINER_JSON).read_text())["step"] == 10  # the first checkpoint, whole
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint", "metrics.jsonl", "train_config.json"]
    resumed = train_sae(dataclasses.replace(config, resume=True), store=synthetic)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert find_checkpoint(tmp_path / "nothing") is None


# ---- on a model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return path


def test_training_from_disk_shards_equals_training_live(llama: HookedModel, corpus: Path, tmp_path: Path) -> None:
    settings = {
        "model": "tiny-llama",
        "hook_name": HOOK,
        "corpus": str(corpus),
        "context_length": 32,
        "batch_contexts": 4,
        "n_tokens": 64 * 12,
        "batch_size_tokens": 64,
        "expansion_factor": 2,
        "k": 4,
        "shuffle_buffer": 0,
        "progress": False,
    }
    live = train_sae(TrainConfig(**settings, out_dir=str(tmp_path / "live")), model=llama)
    sharded = TrainConfig(**settings, out_dir=str(tmp_path / "disk"), activations_dir=str(tmp_path / "shards"))
    disk = train_sae(sharded, model=llama)
    assert (tmp_path / "shards" / "manifest.json").exists()
    assert (disk.cfg.d_in, disk.cfg.d_sae) == (llama.cfg.d_model, 2 * llama.cfg.d_model)
    for name, value in live.state_dict().items():
        assert torch.equal(disk.state_dict()[name], value), name
    store = ActivationStore(llama, [HOOK], str(corpus), context_length=32, batch_contexts=4)
    first = next(store.batches(64))[HOOK]
    with torch.no_grad():  # b_dec started at the geometric median of the first batch and moved from there
        assert (live.b_dec - geometric_median(first).float()).norm() < 0.1 * first.norm(dim=-1).mean()


def test_toml_config_with_overrides_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('architecture = "batchtopk"\nk = 8\nlr = 1e-3\nhook_name = "blocks.2.hook_resid_post"\n')
    config = TrainConfig.from_toml(path, lr=0.5)
    assert (config.architecture, config.k, config.lr) == ("batchtopk", 8, 0.5)
    assert config.hook_name == "blocks.2.hook_resid_post"
    path.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=r"run\.toml: unknown key 'learning_rate'"):
        TrainConfig.from_toml(path)
    path.write_text('batch_size_tokens = "big"\n')
    with pytest.raises(ValueError, match=r"run\.toml: TrainConfig\.batch_size_tokens must be int"):
        TrainConfig.from_toml(path)
    path.write_text("lr = \n")
    with pytest.raises(ValueError, match=r"run\.toml is not valid TOML"):
        TrainConfig.from_toml(path)
    with pytest.raises(ValueError, match="whole number"):
        TrainConfig(architecture="topk", k=2.5)


def test_old_setting_names_are_read_with_a_note_naming_the_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "old.toml"
    path.write_text('source = "corpus.txt"\nshard_dir = "acts"\nbatch_size = 64\nn_tokens = 640\n')
    with pytest.warns(DeprecatedSetting) as caught:
        config = TrainConfig.from_toml(path)
    assert sorted(str(w.message) for w in caught) == [
        f"{path}: batch_size is deprecated: use batch_size_tokens",
        f"{path}: shard_dir is deprecated: use activations_dir",
        f"{path}: source is deprecated: use corpus",
    ]
    assert (config.corpus, config.activations_dir, config.batch_size_tokens) == ("corpus.txt", "acts", 64)
    argv = ["sae", "train", "--source", "c.txt", "--shard-dir", "a", "--batch-size", "8"]
    with pytest.warns(DeprecatedSetting) as caught:
        args = build_parser().parse_args(argv)
    assert [str(w.message) for w in caught] == [
        "--source is deprecated: use --corpus",
        "--shard-dir is deprecated: use --activations-dir",
        "--batch-size is deprecated: use --batch-size-tokens",
    ]
    assert flag_values(args, TrainConfig) == {"corpus": "c.txt", "activations_dir": "a", "batch_size_tokens": 8}
    recorded = {**dataclasses.asdict(config), "source": "corpus.txt", "batch_size": 64}
    del recorded["corpus"], recorded["batch_size_tokens"]
    assert current_names(recorded) == dataclasses.asdict(config)  # train_config.json / trainer.json of older runs


def test_cli_trains_an_sae_that_loads(corpus: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(HookedAutoConfig("llama")).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    (tmp_path / "run.toml").write_text('architecture = "topk"\nk = 4\nbatch_size_tokens = 32\nlr = 0.5\n')
    argv = ["sae", "train", str(tmp_path / "run.toml"), "--model", str(model_dir), "--hook-name", HOOK]
    argv += ["--corpus", str(corpus), "--context-length", "32", "--n-tokens", "320", "--lr", "1e-3"]
    argv += ["--expansion-factor", "2", "--out-dir", str(tmp_path / "out"), "--no-progress", "--log-every", "5"]
    assert main(argv) == 0
    assert "Saved topk SAE" in capsys.readouterr().out
    sae = SAE.load(tmp_path / "out" / "sae")
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.architecture, sae.cfg.k) == (str(model_dir), HOOK, "topk", 4)
    recorded = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert (recorded["lr"], recorded["batch_size_tokens"]) == (1e-3, 32)  # the flag beat the file, the file the default
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(argv) == 1  # the checkpoint is there and --resume was not given
    assert "pass resume=True (--resume)" in capsys.readouterr().err


def test_cli_flags_mirror_the_config_fields() -> None:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["sae"]._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train._actions for option in action.option_strings}
    expected = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)}
    old_names = {"--source", "--shard-dir", "--batch-size"}  # still read, with a DeprecatedSetting warning
    negations = {"--no-resume", "--no-progress", "--no-shard-latents"}  # of the bool fields
    others = negations | {"--config", "--nproc", "-h", "--help"}  # --config: its old form
    assert flags == expected | old_names | others
    args = parser.parse_args(["sae", "train", "--k", "2.5", "--d-sae", "7", "--no-progress", "--lr", "1e-3"])
    assert (args.k, args.d_sae, args.progress, args.lr, args.nproc) == (2.5, 7, False, 1e-3, 1)
    assert parser.parse_args(["sae", "train", "--nproc", "2"]).nproc == 2  # data-parallel (tests/distributed)
    assert not hasattr(args, "batch_size_tokens")  # flags not given stay unset: a TOML file's value is not overridden


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_train_sae_refuses_an_out_dir_it_cannot_write_before_loading_the_model(tmp_path: Path, where: str) -> None:
    (tmp_path / "taken").write_text("not a directory")
    out_dir = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    config = _config(tmp_path, model="no-such-model-anywhere", out_dir=str(out_dir))
    expected = "is a file" if where == "file" else "is under the file"
    with pytest.raises(
        NotADirectoryError, match=rf"out_dir {re.escape(str(out_dir))} {expected}.*choose another out_dir"
    ):
        train_sae(config)  # loading "no-such-model-anywhere" would fail otherwise
    config = _config(tmp_path, activations_dir=str(out_dir), out_dir=str(tmp_path / "run"))
    with pytest.raises(NotADirectoryError, match=r"activations_dir .*choose another activations_dir"):
        train_sae(config)
    assert not (tmp_path / "run").exists()
