"""Issue 13: Ctrl-C on ``mechscope sae train CONFIG`` in a real process: the stage writes its checkpoint and the
command ends with status 130 and ONE line on stderr (after transformers' bar of the model load) giving the exact
command that resumes it, no traceback; that command then finishes the run to the same SAE, bit for bit, as an
uninterrupted run.

The process is ``python -m mechscope`` on a tiny random llama saved to disk. The signal is sent as soon as the first
periodic checkpoint is in place (``checkpoint/trainer.json`` appears when the folder is renamed in, so it is whole),
with most of the run still to go.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mechscope import HookedAutoConfig, HookedModel
from mechscope.sae import SparseAutoencoder
from mechscope.sae.train import TrainConfig, train_sae

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100


def mechscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "mechscope", *args]


def test_ctrl_c_on_sae_train_is_one_line_with_the_resume_command_that_finishes_the_run(tmp_path):
    torch.manual_seed(0)
    model = HookedModel(HookedAutoConfig("llama", num_hidden_layers=1, hidden_size=16, intermediate_size=32))
    model.model.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Foxes and dogs spend their days outside, and the cats watch them from the window. " * 20)
    config = TrainConfig(
        model=str(tmp_path / "model"), hook_name="blocks.0.hook_resid_post", corpus=str(corpus), context_length=16,
        batch_contexts=2, n_tokens=16 * STEPS, batch_size_tokens=16, architecture="relu", warmup_steps=2,
        log_every=50, checkpoint_every=3, checkpoint_seconds=0, shuffle_buffer=0, progress=False,
        out_dir=str(tmp_path / "run"),
    )  # fmt: skip
    path = tmp_path / "train.toml"
    config.to_toml(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        mechscope("sae", "train", str(path)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = tmp_path / "run" / "checkpoint" / "trainer.json"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.002)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    *before, line = stderr.strip().splitlines()
    # all that precedes it is transformers' own bar while the model loads (progress=false silences mechscope's)
    assert all(b.startswith("Loading weights: ") for b in before), stderr
    resume = shlex.join(["mechscope", "sae", "train", str(path), "--resume"])
    assert line.startswith("mechscope sae train: sae train stopped by SIGINT at step ")
    assert f"of {STEPS}; its progress is saved in {tmp_path / 'run' / 'checkpoint'}" in line
    assert line.endswith(f"(checkpoint written); resume: {resume}")
    step = int(line.split(" at step ")[1].split()[0])
    assert 3 <= step < STEPS  # stopped mid-run, after the first checkpoint

    resumed = subprocess.run(mechscope(*shlex.split(resume)[1:]), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    full = train_sae(dataclasses.replace(config, out_dir=str(tmp_path / "full"), progress=False))
    got = SparseAutoencoder.load(tmp_path / "run" / "sae").state_dict()
    assert got.keys() == full.state_dict().keys()
    for name, value in full.state_dict().items():
        assert torch.equal(got[name], value), name
