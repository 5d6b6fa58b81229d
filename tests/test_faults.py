"""Faults that really happen to long stages: a child process running training, a harvest, a count or dashboards is
SIGKILLed or sent SIGINT mid-run; the next run resumes to exactly the uninterrupted result and leaves no temporary
file. Also: a kill between the two moves of a checkpoint swap, temporary files of dead writers, damaged state files.

The child is a fork of the test process (the tiny model is built once). Each stage's public hook (``on_batch``,
``on_chunk``, the training store) writes a marker file and waits for the parent; the parent sends the signal only
once the marker is there and then lets the child go on, so no timing is guessed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechscope.cooccurrence.config import CountingConfig
from mechscope.cooccurrence.layout import CHECKPOINT, file_name
from mechscope.cooccurrence.pipeline import run_count
from mechscope.dashboards.pipeline import run_dashboards
from mechscope.data import ActivationStore
from mechscope.files import DamagedFile, atomic_write, clean_directory
from mechscope.interrupts import Interrupted, stop_on_signals
from mechscope.sae.train import TrainConfig, train_sae
from mechscope.settings import ConfigError
from tests.cooccurrence.test_pipeline import THRESHOLDS, _assert_same, _config, saes  # noqa: F401 (a fixture)
from tests.dashboards.test_resume import assert_identical, config, full, setup  # noqa: F401 (fixtures)

KILLED, INTERRUPTED = signal.SIGKILL, signal.SIGINT


def temporaries(root: Path) -> list[str]:
    """Every temporary or set-aside file or folder of mechscope's writers under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old"))


class Pause:
    """Called by a stage's hook: the first time ``when`` holds, write ``marker`` and wait until ``go`` exists."""

    def __init__(self, directory: Path) -> None:
        self.marker, self.go, self.done = directory / "marker", directory / "go", False

    def __call__(self, when: bool) -> None:
        if when and not self.done:
            self.done = True
            self.marker.write_text("here")
            while not self.go.exists():
                time.sleep(0.005)


def run_child(tmp_path: Path, signum: int, job: Callable[[Pause], object]) -> str:
    """Fork; the child runs ``job(pause)``; once it pauses, send it ``signum`` and let it go on. Returns what the
    child reported: ``"interrupted: MESSAGE"`` (it raised Interrupted) or ``"killed"``."""
    pause = Pause(tmp_path)
    report = tmp_path / "report"
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the job
        code = 1
        try:
            torch.set_num_threads(1)
            job(pause)
            report.write_text("finished")
        except Interrupted as e:
            report.write_text(f"interrupted: {e}")
            code = 3
        except BaseException:
            report.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while not pause.marker.exists():
        finished, _ = os.waitpid(pid, os.WNOHANG)
        assert finished == 0 and time.monotonic() < deadline, report.read_text() if report.exists() else "no pause"
        time.sleep(0.005)
    os.kill(pid, signum)
    time.sleep(0.02)  # the signal is delivered while the child still waits (it only sets a flag)
    pause.go.write_text("go")
    _, status = os.waitpid(pid, 0)
    if signum == KILLED:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, report.read_text()
    return report.read_text()


# ---- training ------------------------------------------------------------------------------------------------------


class Batches:
    """A training store of fixed random batches ``[64, 16]`` (the same every call); with ``pause``, pauses after
    serving batch ``at``."""

    def __init__(self, pause: Pause | None = None, at: int = 0) -> None:
        self.pause, self.at = pause, at

    def batches(self, batch_size: int, n_tokens=None, shuffle_buffer=0, seed=0) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(0)
        for i in range(n_tokens // batch_size):
            yield {"blocks.0.hook_resid_post": torch.randn(batch_size, 16, generator=g) * (1 + i % 3)}
            if self.pause is not None:
                self.pause(i + 1 == self.at)


def train_config(out: Path, **overrides) -> TrainConfig:
    settings = dict(
        hook_name="blocks.0.hook_resid_post", n_tokens=64 * 24, batch_size_tokens=64, expansion_factor=4,
        architecture="relu", warmup_steps=2, log_every=1, checkpoint_every=5, checkpoint_seconds=0, out_dir=str(out),
        progress=False, shuffle_buffer=0,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.parametrize("signum", [KILLED, INTERRUPTED], ids=["sigkill", "sigint"])
def test_training_killed_or_interrupted_resumes_exactly(tmp_path, signum):
    full_sae = train_sae(train_config(tmp_path / "full"), store=Batches())
    config = train_config(tmp_path / "run")
    # paused while the batch of step 9 is fetched (after step 8); the last periodic checkpoint is step 5
    report = run_child(tmp_path, signum, lambda pause: train_sae(config, store=Batches(pause, at=8)))
    step = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())["step"]
    if signum == INTERRUPTED:  # the step under way was finished and checkpointed
        assert step == 9
        assert "sae train stopped by SIGINT at step 9 of 24" in report and "resume=True" in report
    else:
        assert step == 5
    with pytest.raises(FileExistsError, match="resume=True"):
        train_sae(config, store=Batches())
    resumed = train_sae(dataclasses.replace(config, resume=True), store=Batches())
    for name, value in full_sae.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 25))
    assert temporaries(tmp_path / "run") == []


def test_training_checkpoints_by_default_and_by_time(tmp_path):
    defaults = TrainConfig()
    assert defaults.checkpoint_every > 0 and defaults.checkpoint_seconds > 0
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        TrainConfig(checkpoint_seconds=-1)
    config = train_config(tmp_path / "run", checkpoint_every=0, checkpoint_seconds=1e-9)  # due after every step
    writes: list[Path] = []

    def count_writes(path: Path, write) -> Path:
        if path.name == "trainer.json":
            writes.append(path)
        return atomic_write(path, write)

    train_sae(config, store=Batches(), write_file=count_writes)
    assert len(writes) == 24  # steps 1-23 by time, then the final one


#: how a file gets damaged: overwritten with random bytes, cut in half (a write torn by a full disk), emptied
DAMAGES = {
    "random bytes": lambda data: os.urandom(500),
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
}


def test_a_damaged_trainer_checkpoint_is_one_error_naming_the_file_and_the_fix(tmp_path):
    """Before, a damaged file of the SAE inside the checkpoint said to download or save the SAE again."""
    config = train_config(tmp_path / "run")
    train_sae(config, store=Batches(), stop_after=10)
    checkpoint = tmp_path / "run" / "checkpoint"
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    assert [str(p.relative_to(checkpoint)) for p in files] == [
        "sae/cfg.json", "sae/sae_weights.safetensors", "trainer.json", "trainer.safetensors",
    ]  # fmt: skip
    fix = f"delete {checkpoint} to train from scratch, or choose another out_dir"
    for file in files:
        intact = file.read_bytes()
        for damage, damaged in DAMAGES.items():
            file.write_bytes(damaged(intact))
            with pytest.raises(DamagedFile) as e:
                train_sae(dataclasses.replace(config, resume=True), store=Batches())
            message = str(e.value)
            assert message.startswith(str(file)) and message.endswith(fix), (file.name, damage, message)
            assert "pickle" not in message and "download" not in message, message
        file.write_bytes(intact)
    resumed = train_sae(dataclasses.replace(config, resume=True), store=Batches())  # whole again: it resumes
    full_sae = train_sae(train_config(tmp_path / "full"), store=Batches())
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in full_sae.state_dict().items())


# ---- harvest -------------------------------------------------------------------------------------------------------

HARVEST = dict(context_length=16, batch_contexts=2, shard_tokens=60)


def harvest_store(llama, corpus: Path, out: Path) -> ActivationStore:
    return ActivationStore(llama, ["blocks.1.hook_resid_post"], corpus, activations_dir=out, **HARVEST)


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("Foxes and dogs spend their days outside, and the cats watch them from the window. " * 40)
    return path


@pytest.mark.parametrize("signum", [KILLED, INTERRUPTED], ids=["sigkill", "sigint"])
def test_a_harvest_killed_or_interrupted_resumes_to_the_same_shards(llama, text, tmp_path, signum):
    full_store = harvest_store(llama, text, tmp_path / "full")
    full_store.harvest(300, progress=False, checkpoint_seconds=0)
    store = harvest_store(llama, text, tmp_path / "run")

    def job(pause: Pause) -> None:  # paused in the pass of contexts 8-9, in the middle of the second shard
        store.harvest(300, progress=False, checkpoint_seconds=0, on_batch=lambda first, n: pause(first == 8))

    report = run_child(tmp_path, signum, job)
    pending = tmp_path / "run" / "pending.safetensors"
    if signum == INTERRUPTED:  # the rows of the unfinished shard were saved
        assert "harvest stopped by SIGINT" in report and "same settings" in report
        assert int(load_file(pending)["context"].max()) == 9
    else:
        assert not pending.exists()
    assert store.harvest(300, progress=False) == full_store.stored_tokens()
    full_manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert json.loads((tmp_path / "run" / "manifest.json").read_text()) == full_manifest
    for shard in full_manifest["shards"]:
        want, got = load_file(tmp_path / "full" / shard["file"]), load_file(tmp_path / "run" / shard["file"])
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), shard["file"]
    assert not pending.exists() and temporaries(tmp_path / "run") == []


def test_a_damaged_activation_manifest_is_one_error_naming_the_file_and_the_fix(llama, text, tmp_path):
    out = tmp_path / "shards"
    harvest_store(llama, text, out).harvest(120, progress=False)
    manifest = out / "manifest.json"
    intact = manifest.read_bytes()
    fix = f"delete {out} to harvest again, or choose another activations_dir"
    damages = {**DAMAGES, "not the manifest": lambda data: b"[1, 2]", "no shards": lambda data: b'{"settings": {}}'}
    for damage, damaged in damages.items():
        manifest.write_bytes(damaged(intact))
        with pytest.raises(DamagedFile) as e:
            harvest_store(llama, text, out).harvest(300, progress=False)
        message = str(e.value)
        assert message.startswith(f"{manifest} cannot be read") and message.endswith(fix), (damage, message)
        assert "pickle" not in message
    manifest.write_bytes(intact)
    assert harvest_store(llama, text, out).harvest(120, progress=False) >= 120


# ---- count ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [KILLED, INTERRUPTED], ids=["sigkill", "sigint"])
def test_a_count_killed_or_interrupted_resumes_to_the_same_counts(llama, saes, text, tmp_path, signum):  # noqa: F811
    full_counts = run_count(_config(tmp_path, str(text), "full"), llama, saes)
    config = _config(tmp_path, str(text), "run", checkpoint_every=2)

    def job(pause: Pause) -> None:
        run_count(config, llama, saes, on_batch=lambda done, rows: pause(done == 3))

    report = run_child(tmp_path, signum, job)
    with np.load(tmp_path / "run" / CHECKPOINT) as data:
        done = json.loads(data["state"].item())["batches_done"]
    if signum == INTERRUPTED:  # batch 3 was checkpointed although checkpoint_every is 2
        assert done == 3 and "cooc count stopped by SIGINT at batch 3 of" in report
    else:
        assert done == 2
    _assert_same(run_count(config, llama, saes), full_counts)
    assert temporaries(tmp_path / "run") == []


class Killed(Exception):
    """Raised from ``on_batch``: ends a count as a kill would (the batches since the last checkpoint are lost)."""


def test_a_count_checkpoints_by_batches_and_by_time(llama, saes, text, tmp_path):  # noqa: F811
    """Before, every batch was checkpointed (at d_sae 16384 a checkpoint of a few hundred MB takes about as long as
    counting a batch); now every ``checkpoint_every`` batches or ``checkpoint_seconds``, whichever comes first."""
    defaults = CountingConfig(model="m")
    assert (defaults.checkpoint_every, defaults.checkpoint_seconds) == (50, 300.0)
    for bad in (-1, float("nan")):
        wanted = rf"\[counting\]\.checkpoint_seconds must be (a finite number )?at least 0, got {bad}"
        with pytest.raises(ConfigError, match=wanted):
            CountingConfig(model="m", checkpoint_seconds=bad)
    with pytest.raises(ConfigError, match=r"\[counting\]\.checkpoint_every must be at least 0, got -2"):
        CountingConfig(model="m", checkpoint_every=-2)
    full_counts = run_count(_config(tmp_path, str(text), "full"), llama, saes)

    def kill_at(done: int) -> Callable[[int, object], None]:
        def on_batch(batches_done: int, rows: object) -> None:
            if batches_done == done:
                raise Killed

        return on_batch

    cadences = {"time": (0, 1e-9), "batches": (3, 0.0), "batches, not yet by time": (3, 300.0), "never": (0, 0.0)}
    for name, (every, seconds) in cadences.items():
        config = _config(tmp_path, str(text), name, checkpoint_every=every, checkpoint_seconds=seconds)
        with pytest.raises(Killed):
            run_count(config, llama, saes, on_batch=kill_at(5))  # killed counting batch 5: 4 are done
        checkpoint = tmp_path / name / CHECKPOINT
        if name == "never":
            assert not checkpoint.exists()
            continue
        with np.load(checkpoint) as data:
            assert json.loads(data["state"].item())["batches_done"] == (4 if name == "time" else 3), name
        _assert_same(run_count(config, llama, saes), full_counts)
        assert temporaries(tmp_path / name) == []


def test_a_done_count_with_a_missing_or_damaged_file_writes_it_again(llama, saes, text, tmp_path, capsys):  # noqa: F811
    config = _config(tmp_path, str(text), "run")
    counts = run_count(config, llama, saes)
    hook = next(iter(saes))
    damaged = tmp_path / "run" / hook / file_name("total", THRESHOLDS[0])
    for fault in ("truncate", "delete"):
        if fault == "truncate":
            damaged.write_bytes(damaged.read_bytes()[:40])
        else:
            damaged.unlink()
        capsys.readouterr()
        _assert_same(run_count(config, llama, saes), counts)
        out = capsys.readouterr().out
        assert f"count: done, but {damaged}" in out and "writing the counts again" in out
        run_count(config, llama, saes)
        assert "already done" in capsys.readouterr().out  # whole again


def test_a_damaged_count_checkpoint_is_one_error_naming_it(llama, saes, text, tmp_path):  # noqa: F811
    config = _config(tmp_path, str(text), "run")
    checkpoint = tmp_path / "run" / CHECKPOINT
    checkpoint.parent.mkdir()
    for content in (os.urandom(500), b"PK\x03\x04" + os.urandom(100), b""):
        checkpoint.write_bytes(content)
        with pytest.raises(DamagedFile, match=rf"{checkpoint} cannot be read .*delete it to count from scratch") as e:
            run_count(config, llama, saes)
        assert "pickle" not in str(e.value)


# ---- dashboards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [KILLED, INTERRUPTED], ids=["sigkill", "sigint"])
def test_dashboards_killed_or_interrupted_resume_to_the_same_result(setup, llama, full, tmp_path, signum):  # noqa: F811
    run = config(setup, f"faults-{signum}", checkpoint_every=2)

    def job(pause: Pause) -> None:
        run_dashboards(run, model=llama, on_chunk=lambda state: pause((state.pass_number, state.key) == (2, 3)))

    report = run_child(tmp_path, signum, job)
    meta = json.loads((Path(run.out_dir) / "checkpoint" / "state.json").read_text())
    if signum == INTERRUPTED:  # the chunk under way was checkpointed
        assert (meta["pass"], meta["key"]) == (2, 3) and "dashboards stopped by SIGINT at pass 2" in report
    else:
        assert (meta["pass"], meta["key"]) == (2, 1)  # checkpoints every two chunks, counted across passes
    assert_identical(run_dashboards(run, model=llama), full)
    assert temporaries(Path(run.out_dir)) == []


# ---- swaps, temporaries, handlers ------------------------------------------------------------------------------------


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_kill_between_the_two_moves_of_a_checkpoint_swap_is_recovered(tmp_path):
    """The state a kill leaves between "move the old checkpoint aside" and "move the new one in": the old one set
    aside, the new one in a dead writer's temporary folder. The resume uses the set-aside one."""
    full_sae = train_sae(train_config(tmp_path / "full"), store=Batches())
    config = train_config(tmp_path / "run")
    train_sae(config, store=Batches(), stop_after=10)
    out = tmp_path / "run"
    os.replace(out / "checkpoint", out / ".checkpoint.old")
    (out / f".checkpoint.tmp{dead_pid()}").mkdir()
    resumed = train_sae(dataclasses.replace(config, resume=True), store=Batches())
    for name, value in full_sae.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert temporaries(out) == []


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    names = [f".shard_00003.tmp{dead}.safetensors", f".count_checkpoint.tmp{dead}.npz", f".checkpoint.tmp{dead}"]
    for name in names[:2]:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / names[2]).mkdir()
    (tmp_path / f".manifest.tmp{alive}.json").write_text("{")  # a writer that still runs
    (tmp_path / ".notes").write_text("not ours")
    assert sorted(p.name for p in clean_directory(tmp_path)) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".manifest.tmp{alive}.json", ".notes"]


def test_signal_handlers_are_restored_and_a_late_signal_is_not_lost():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert signal.getsignal(signal.SIGINT) is not before[0]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop and stop.signum == signal.SIGINT
        with pytest.raises(Interrupted, match="x stopped by SIGINT at y; its progress is saved in z"):
            raise stop.interrupted("x", "z", "y")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(KeyboardInterrupt), stop_on_signals():  # not acted on inside: delivered on the way out
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
