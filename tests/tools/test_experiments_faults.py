"""The experiment bench under hostile results, arguments, models and damaged records: nothing is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechscope.tools import experiments
from mechscope.tools.experiments import Experiment, ExperimentRecordWarning, UnstoredValue


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str is broken")


@pytest.fixture
def exp(tmp_path):
    return Experiment(object(), save_dir=tmp_path / "runs")


def _folder(exp, run_id):
    (folder,) = exp.save_dir.glob(f"*/{run_id}")
    return folder


def test_unstorable_parts_of_a_result_are_recorded_as_unstored_and_the_rest_is_kept(exp):
    loop = [torch.arange(3)]
    loop.append(loop)
    deep: list = [7]
    for _ in range(experiments._MAX_DEPTH + 5):
        deep = [deep]
    kept = torch.linspace(0, 1, 5)
    result = {
        "kept": kept,
        "meta": torch.empty(2, 3, device="meta"),
        "loop": loop,
        "deep": deep,
        "odd": BadRepr(),
        "wide": np.ones(2, dtype=np.longdouble),
        "label": "fine",
    }

    @exp.log_experiment
    def hostile():
        return result

    with pytest.warns(ExperimentRecordWarning) as caught:
        returned = hostile()
    assert returned is result and returned["loop"][1] is loop  # the function's own object, untouched
    (message,) = [str(w.message) for w in caught]
    for field in (
        "result.meta (Tensor: ValueError: a meta tensor has no data",
        "result.loop.1 (list: it contains itself",
        "result.odd (BadRepr:",
        "result.wide (ndarray: TypeError",
    ):
        assert field in message
    assert f"nested deeper than {experiments._MAX_DEPTH} levels" in message
    (record,) = exp.runs("hostile")  # listed
    assert record["status"] == "ok" and len(record["unstored"]) == 5
    back = exp.load_run(record["run_id"])
    assert torch.equal(back["kept"], kept) and back["label"] == "fine"
    assert torch.equal(back["loop"][0], torch.arange(3))
    assert back["loop"][1] == UnstoredValue("builtins.list", repr(loop))
    assert back["meta"] == UnstoredValue("torch.Tensor", repr(result["meta"]))
    assert back["odd"].type.endswith("BadRepr") and "repr raised RuntimeError: repr is broken" in back["odd"].repr
    level = back["deep"]  # at depth 1 (the dict is at 0): stored down to depth _MAX_DEPTH - 1
    for _ in range(experiments._MAX_DEPTH - 2):
        level = level[0]
    assert isinstance(level, list)  # the deepest list stored
    level = level[0]
    assert isinstance(level, UnstoredValue) and level.type == "builtins.list"


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")  # torch's own, on to_sparse_csr
def test_sparse_tensors_and_odd_numpy_arrays_are_stored_exactly(exp):
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]])
    result = (
        dense.to_sparse(),
        dense.to_sparse_csr(),
        dense.to_sparse_csc(),
        np.arange(5.0)[::-1],  # negative stride
        np.arange(3, dtype=">i4"),  # big-endian
        torch.tensor([1 + 2j, 3 - 1j]).conj(),  # a lazy conjugate view
    )

    @exp.log_experiment
    def sparse():
        return result

    assert sparse() is result
    coo, csr, csc, rev, big, conj = exp.load_run(exp.runs("sparse")[0]["run_id"])
    assert (coo.layout, csr.layout, csc.layout) == (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)
    for t in (coo, csr, csc):
        assert torch.equal(t.to_dense(), dense)
    assert np.array_equal(rev, [4.0, 3.0, 2.0, 1.0, 0.0]) and np.array_equal(big, [0, 1, 2])
    assert torch.equal(conj, torch.tensor([1 - 2j, 3 + 1j]))


def test_an_argument_that_cannot_be_described_does_not_stop_the_run(exp):
    loop: list = [1]
    loop.append(loop)
    calls = []

    @exp.log_experiment
    def takes(odd, loop, sparse, meta):
        calls.append(odd)
        return 42

    odd = BadRepr()
    with pytest.warns(ExperimentRecordWarning, match=r"argument odd \(repr raised RuntimeError: repr is broken\)"):
        assert takes(odd, loop, torch.eye(2).to_sparse(), torch.empty(3, device="meta")) == 42
    assert calls == [odd]
    args = exp.runs("takes")[0]["arguments"]
    assert args["odd"]["type"].endswith("BadRepr") and "repr raised RuntimeError" in args["odd"]["repr"]
    assert args["loop"][0] == 1 and args["loop"][1]["repr"] == "<contains itself>"
    assert args["sparse"]["layout"] == "sparse_coo" and args["sparse"]["shape"] == [2, 2]
    assert args["sparse"]["mean"] == 1.0  # of the stored values
    assert args["meta"]["shape"] == [3] and args["meta"]["data"].startswith("not summarised (ValueError: a meta")


def test_an_exception_whose_str_raises_is_recorded_and_reraised_itself(exp):
    @exp.log_experiment
    def broken():
        raise UnprintableError()

    with pytest.raises(UnprintableError):
        broken()
    assert exp.runs("broken")[0]["error"] == "UnprintableError: <UnprintableError whose str raised RuntimeError>"


def test_a_model_the_bench_cannot_fully_identify_still_runs(tmp_path):
    class Cfg:
        def to_dict(self):
            return {"dtype": torch.float32, "n_layers": 2}  # as TransformerLens's config does

    meta = torch.nn.Linear(2, 2, device="meta")
    meta.cfg = Cfg()
    exp = Experiment(meta, save_dir=tmp_path)
    with pytest.warns(ExperimentRecordWarning, match=r"weights_sha256 \(NotImplementedError"):
        assert exp.log_experiment(lambda: 5)() == 5
    model = exp.runs()[0]["model"]
    assert model["weights_sha256"] is None and model["n_params"] == 6
    assert model["cfg"] == {"dtype": {"type": "torch.dtype", "repr": "torch.float32"}, "n_layers": 2}


def test_a_damaged_record_is_skipped_and_named(exp):
    @exp.log_experiment
    def square(x):
        return torch.full((2,), float(x * x))

    for i in range(3):
        square(i)
    ids = [r["run_id"] for r in exp.runs("square")]
    run_json = _folder(exp, ids[1]) / "run.json"
    for damage in (run_json.read_text()[:40], "[1, 2]", b"\xff\xfe garbage"):
        run_json.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
        with pytest.warns(ExperimentRecordWarning, match=f"skipped: {run_json} is not a readable run record"):
            assert [r["run_id"] for r in exp.runs()] == [ids[0], ids[2]]
        with pytest.raises(ValueError, match=f"{run_json} is not a readable run record .*delete its folder"):
            exp.load_run(ids[1])
    tensors = _folder(exp, ids[2]) / "result.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:30])
    with pytest.raises(ValueError, match=f"{tensors} is not a readable safetensors file"):
        exp.load_run(ids[2])
    tensors.unlink()
    with pytest.raises(ValueError, match=f"{tensors} lacks the tensor 'result'"):
        exp.load_run(ids[2])
    assert torch.equal(exp.load_run(ids[0]), torch.zeros(2))


def test_a_failed_write_leaves_no_partial_file_and_still_returns_the_result(exp, monkeypatch):
    def torn_save(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(experiments, "save_file", torn_save)
    value = torch.ones(4)

    @exp.log_experiment
    def big():
        return value

    with pytest.warns(ExperimentRecordWarning, match=r"could not be recorded in .*No space left on device"):
        assert big() is value
    (folder,) = (exp.save_dir / "big").iterdir()
    assert [p.name for p in folder.iterdir()] == [f".writer-{socket.gethostname()}-{os.getpid()}"]  # no partial file
    assert exp.runs("big") == []


_KILLED_WRITER = """
import sys, torch
from mechscope.tools.experiments import Experiment
exp = Experiment(object(), save_dir=sys.argv[1])
@exp.log_experiment
def big(i):
    return {"i": i, "x": torch.full((2_000_000,), float(i))}
print("ready", flush=True)
i = 0
while True:
    big(i)
    i += 1
"""


def test_a_killed_writer_never_leaves_a_half_record(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("big/*/run.json"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    exp = Experiment(object(), save_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExperimentRecordWarning)  # no damaged record to skip
        runs = exp.runs("big")
    assert len(runs) >= 3
    for record in runs:
        back = exp.load_run(record["run_id"])
        assert torch.equal(back["x"], torch.full((2_000_000,), float(back["i"])))
    for tensors in tmp_path.glob("big/*/result.safetensors"):  # also the killed run's, if it got that far
        assert load_file(str(tensors))["result.x"].shape == (2_000_000,)
    torn = tmp_path / "big" / "20000101T000000.000000Z-0badf00d"  # as a kill mid-write leaves it, made sure of
    torn.mkdir()
    (torn / f".writer-{socket.gethostname()}-{proc.pid}").touch()
    (torn / ".result.tmp1.safetensors").write_bytes(b"half")

    @exp.log_experiment
    def big(i):
        return i

    assert big(-1) == -1  # the next run of the same function clears what the killed writer left
    assert {p.name for p in tmp_path.glob("big/*")} == {r["run_id"] for r in exp.runs("big")}
    assert [p.name for p in tmp_path.glob("big/*/.*")] == []  # no temporary file, no writer marker


def test_a_save_dir_that_is_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    calls = []

    def f():
        calls.append(1)

    exp = Experiment(object(), save_dir=tmp_path)
    with pytest.raises(NotADirectoryError, match=r"f is a file, not a folder of runs: move it or choose another"):
        exp.log_experiment(f)()
    for save_dir in (tmp_path / "f", tmp_path / "f" / "deeper"):  # the save_dir itself, or a folder above it
        with pytest.raises(
            NotADirectoryError, match=r"f is a file, not a folder \(save_dir is .*choose another save_dir"
        ):
            Experiment(object(), save_dir=save_dir).log_experiment(f)()
    assert calls == [] and (tmp_path / "f").read_text() == "not a folder"
