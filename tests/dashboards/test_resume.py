"""A dashboards run killed in any pass resumes to exactly the uninterrupted result; states merge across ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from mechscope.dashboards.build import (
    PASS_PARTS,
    DashboardSettings,
    DashboardState,
    chunk_list,
    compute_dashboards,
    run_pass,
)
from mechscope.dashboards.layout import CHECKPOINT, CHECKPOINT_META, CHECKPOINT_TENSORS
from mechscope.dashboards.outputs import load_dashboards
from mechscope.dashboards.pipeline import DashboardsConfig, run_dashboards
from mechscope.data.store import ActivationStore
from mechscope.files import SettingsMismatch, atomic_write
from mechscope.sae import SAE, SAEConfig, SparseAutoencoder
from tests.dashboards.test_build import D_IN, D_SAE, HOOK, stored_rows
from tests.sae_utils import random_weights

SETTINGS = DashboardSettings(n_top=3, window=2, n_bins=3, per_bin=2, histogram_bins=4, n_logits=5)


class Killed(Exception):
    """What an ``on_chunk`` hook raises in place of a kill."""


def assert_identical(a, b, where: str = "dashboards") -> None:
    """Every tensor of two (nested) dataclasses equal, dtype and bits; every other field equal."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{where}.{f.name}"
        elif dataclasses.is_dataclass(x) and not isinstance(x, DashboardSettings):
            assert_identical(x, y, f"{where}.{f.name}")
        else:
            assert x == y, f"{where}.{f.name}"


def small_sae(seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(D_IN, D_SAE, "topk", k=4))
    sae.load_state_dict(random_weights(D_IN, D_SAE, seed))
    return sae.eval()


class KillAt:
    """An ``on_chunk`` hook that keeps a copy of the state after every chunk (as a checkpoint every chunk would) and
    raises once pass ``pass_number`` has read ``k`` chunks."""

    def __init__(self, pass_number: int, k: int) -> None:
        self.at, self.seen, self.saved = (pass_number, k), [], None

    def __call__(self, state: DashboardState) -> None:
        self.seen.append((state.pass_number, state.key))
        if (state.pass_number, state.key) == self.at:
            raise Killed
        tensors = {name: t.clone() for name, t in state.tensors().items()}
        self.saved = DashboardState.from_tensors(state.settings, state.pass_number, state.key, tensors)


# ---- compute_dashboards, in memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("pass_number", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 3])
def test_resuming_a_state_from_any_pass_gives_the_uninterrupted_dashboards(pass_number, k):
    sae, (_, chunks) = small_sae(), stored_rows()
    W_U = torch.randn(D_IN, 30, generator=torch.Generator().manual_seed(1))  # noqa: N806
    full = compute_dashboards(sae, HOOK, chunk_list(chunks), W_U, None, SETTINGS, progress=False)
    kill = KillAt(pass_number, k)
    with pytest.raises(Killed):
        compute_dashboards(sae, HOOK, chunk_list(chunks), W_U, None, SETTINGS, progress=False, on_chunk=kill)
    if (pass_number, k) != (1, 1):  # killed on the very first chunk, there is nothing to resume: start again
        assert kill.saved is not None and kill.seen[-2] == (kill.saved.pass_number, kill.saved.key)
    seen = []
    resumed = compute_dashboards(
        sae, HOOK, chunk_list(chunks), W_U, None, SETTINGS, False, resume=kill.saved,
        on_chunk=lambda s: seen.append((s.pass_number, s.key)),
    )  # fmt: skip
    assert_identical(resumed, full)
    n = len(chunks)
    done_before = kill.seen[:-1]  # every chunk is read once per pass over the killed and the resumed run
    assert sorted(done_before + seen) == [(p, key) for p in (1, 2, 3) for key in range(1, n + 1)]


def test_other_settings_than_the_resume_state_are_refused():
    sae, (_, chunks) = small_sae(), stored_rows()
    state = DashboardState.start(D_SAE, SETTINGS)
    with pytest.raises(ValueError, match="resume state has settings"):
        compute_dashboards(
            sae, HOOK, chunk_list(chunks), torch.randn(D_IN, 30), None, DashboardSettings(), resume=state
        )


@pytest.mark.parametrize("pass_number", [1, 2, 3])
def test_states_of_ranks_that_split_the_chunks_merge_to_the_single_run(pass_number):
    sae, (_, chunks) = small_sae(2), stored_rows(2)
    state = DashboardState.start(D_SAE, SETTINGS)
    for _ in range(pass_number - 1):
        state = run_pass(state, sae, HOOK, chunk_list(chunks), progress=False).next_pass()
    start = state.tensors()

    def fresh() -> DashboardState:
        return DashboardState.from_tensors(SETTINGS, pass_number, 0, {k: v.clone() for k, v in start.items()})

    single = run_pass(fresh(), sae, HOOK, chunk_list(chunks), progress=False)
    ranks = [run_pass(fresh(), sae, HOOK, chunk_list(chunks[r::2]), progress=False) for r in (1, 0)]
    merged = ranks[0].merge(ranks[1])
    got, want = merged.tensors(), single.tensors()
    assert got.keys() == want.keys() and any(k.startswith(PASS_PARTS[pass_number][0]) for k in got)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    with pytest.raises(ValueError, match="same pass"):
        merged.merge(DashboardState.start(D_SAE, SETTINGS) if pass_number > 1 else fresh().next_pass())


# ---- the pipeline, on disk ----------------------------------------------------------------------------------------

LLAMA_HOOK, CONTEXT, BATCH_CONTEXTS, N_TOKENS, SHARD_TOKENS = "blocks.1.hook_resid_post", 32, 2, 300, 60


@pytest.fixture(scope="module")
def setup(llama, tmp_path_factory) -> Path:
    """A saved SAE on the tiny llama's ``LLAMA_HOOK`` and a harvest of five shards (so every pass reads five
    chunks)."""
    root = tmp_path_factory.mktemp("dash")
    (root / "corpus.txt").write_text("A small corpus, about foxes and dogs and the days they spend outside. " * 60)
    d = llama.cfg.d_model
    sae = SAE(SAEConfig(d, 4 * d, "topk", k=6, hook_name=LLAMA_HOOK))
    sae.load_state_dict(random_weights(d, 4 * d, 3))
    sae.save(root / "sae")
    store = ActivationStore(
        llama, LLAMA_HOOK, root / "corpus.txt", context_length=CONTEXT, batch_contexts=BATCH_CONTEXTS,
        activations_dir=root / "activations", shard_tokens=SHARD_TOKENS,
    )  # fmt: skip
    store.harvest(N_TOKENS, progress=False)
    assert len(json.loads((root / "activations" / "manifest.json").read_text())["shards"]) == 5
    return root


def config(root: Path, out: str, **overrides) -> DashboardsConfig:
    settings = {
        "sae": str(root / "sae"),
        "model": "tiny-llama",
        "activations_dir": str(root / "activations"),
        "corpus": str(root / "corpus.txt"),
        "context_length": CONTEXT,
        "batch_contexts": BATCH_CONTEXTS,
        "out_dir": str(root / out),
        "progress": False,
        "checkpoint_every": 1,
        "checkpoint_seconds": 0,
        "dashboards": SETTINGS,
    }
    return DashboardsConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def full(setup, llama):
    return run_dashboards(config(setup, "full"), model=llama)


def chunks_read(calls: list):
    return lambda state: calls.append((state.pass_number, state.key))


@pytest.mark.parametrize("pass_number", [1, 2, 3])
def test_a_run_killed_in_any_pass_resumes_to_the_uninterrupted_result(setup, llama, full, pass_number):
    run = config(setup, f"killed{pass_number}")
    with pytest.raises(Killed):
        run_dashboards(run, model=llama, on_chunk=KillAt(pass_number, 3))
    meta = json.loads((Path(run.out_dir) / CHECKPOINT / CHECKPOINT_META).read_text())
    assert (meta["pass"], meta["key"]) == (pass_number, 2)  # the chunk it was killed on is not in the checkpoint
    assert meta["settings"] == dataclasses.asdict(SETTINGS) and meta["stored_tokens"] == full.n_tokens
    assert not (Path(run.out_dir) / "dashboards.json").exists()

    calls: list = []
    resumed = run_dashboards(run, model=llama, on_chunk=chunks_read(calls))
    assert calls[:3] == [(pass_number, 3), (pass_number, 4), (pass_number, 5)]  # each remaining chunk read once
    assert len(calls) == 3 + 5 * (3 - pass_number)
    assert_identical(resumed, full)
    assert_identical(load_dashboards(run.out_dir), full)
    assert not (Path(run.out_dir) / CHECKPOINT).exists()  # deleted once the result is written


def test_a_checkpoint_under_other_settings_or_rows_is_refused_naming_them(setup, llama, full):
    run = config(setup, "mismatch")
    with pytest.raises(Killed):
        run_dashboards(run, model=llama, on_chunk=KillAt(2, 1))
    other = dataclasses.replace(run, dashboards=dataclasses.replace(SETTINGS, n_top=4), checkpoint_every=2)
    with pytest.raises(SettingsMismatch, match=r"checkpoint was written .*'n_top': \(3, 4\).*delete .*checkpoint"):
        run_dashboards(other, model=llama)
    with pytest.raises(SettingsMismatch, match=r"'model': \('tiny-llama', 'another'\)"):
        run_dashboards(dataclasses.replace(run, model="another"), model=llama)
    retrained = SparseAutoencoder.load(setup / "sae")
    with torch.no_grad():
        retrained.W_enc[0, 0] += 1.0  # one weight changed: the same folder, another SAE
    with pytest.raises(SettingsMismatch, match=r"'sae_sha256'"):
        run_dashboards(run, model=llama, sae=retrained)
    # the checkpoint is left as it was: the same settings resume it (the checkpoint cadence is not a setting)
    assert_identical(run_dashboards(dataclasses.replace(run, checkpoint_every=3), model=llama), full)


def test_checkpoints_are_throttled_by_time(setup, llama, full):
    run = config(setup, "throttled", checkpoint_every=0, checkpoint_seconds=3600)
    with pytest.raises(Killed):
        run_dashboards(run, model=llama, on_chunk=KillAt(3, 4))
    assert not (Path(run.out_dir) / CHECKPOINT).exists()  # an hour has not passed: nothing written
    calls: list = []
    assert_identical(run_dashboards(run, model=llama, on_chunk=chunks_read(calls)), full)
    assert calls[0] == (1, 1) and len(calls) == 15  # started again


def test_a_sigkill_while_writing_a_checkpoint_leaves_the_last_one_and_no_litter(setup, llama, full):
    """A forked child writes checkpoints and is SIGKILLed half-way through its third; the parent resumes."""
    run = config(setup, "sigkill")
    writes: list[Path] = []

    def killed_in_the_third_checkpoint(path: Path, write) -> Path:
        if path.name == CHECKPOINT_TENSORS:
            writes.append(path)
            if len(writes) == 3:
                path.write_bytes(b"half a safetensors file")  # inside the checkpoint's temporary folder
                os.kill(os.getpid(), signal.SIGKILL)
        return atomic_write(path, write)

    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the run
        try:
            torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
            run_dashboards(run, model=llama, write_file=killed_in_the_third_checkpoint)
        finally:
            os._exit(1)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    out = Path(run.out_dir)
    assert [p.name for p in out.glob(f".{CHECKPOINT}.tmp*")] == [f".{CHECKPOINT}.tmp{pid}"]  # the half-written one
    assert json.loads((out / CHECKPOINT / CHECKPOINT_META).read_text())["key"] == 2  # the second, whole

    calls: list = []
    assert_identical(run_dashboards(run, model=llama, on_chunk=chunks_read(calls)), full)
    assert calls[0] == (1, 3)
    assert sorted(p.name for p in out.iterdir()) == ["dashboards.json", "dashboards.safetensors", "vocab.json"]
