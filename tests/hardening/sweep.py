"""The hardening sweep (issue 13): bad inputs against mechscope on tiny random models, each classified in code.

Every :class:`Case` is one bad input (or one hostile result) and declares what a good answer looks like: the error
types it may raise and the words its message must contain (the field, the accepted forms, the file, the fix). Running
it gives one of four classes:

- ``clear``: it raised an expected type whose message names the problem and the fix (every declared word), or, where
  a warning is the right answer (``warns``) or the input must be taken as it is (``accept``), it did that;
- ``unclear``: it raised, but another type or a message missing some word (a torch/numpy/transformers internal);
- ``silent``: it was accepted, no error;
- ``lost``: a result or the user's data was lost (the case's ``lost`` check names what).

Run it (about a minute) from the repository root; ``--write`` regenerates docs/hardening.md::

    PYTHONPATH=$PWD .venv/bin/python -m tests.hardening.sweep            # print the table
    PYTHONPATH=$PWD .venv/bin/python -m tests.hardening.sweep --write    # and rewrite docs/hardening.md
    PYTHONPATH=$PWD .venv/bin/python -m tests.hardening.sweep --only tokens,hooks

tests/hardening/test_sweep.py runs every case and fails on any that is not clear.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub retries

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

from mechscope import HookedAutoConfig, HookedModel, files, tools
from mechscope.apps.cli import error_line
from mechscope.apps.cli import main as cli_main
from mechscope.apps.explorer.launch import run_app
from mechscope.apps.main_job import MainJobConfig
from mechscope.cooccurrence import layout, pipeline
from mechscope.cooccurrence.config import AnalysisConfig, CoocConfig, CountingConfig, PCAConfig
from mechscope.dashboards.pipeline import DashboardsConfig
from mechscope.data import corpus
from mechscope.sae import SAEConfig, SparseAutoencoder, load_sae, save_sae
from mechscope.sae.train import CHECKPOINT_DIR, TRAINER_JSON, TRAINER_TENSORS, TrainConfig, train_sae
from mechscope.settings import ConfigError, _is_config, matches, without_none
from mechscope.tools.experiments import Experiment
from tests.conftest import build_pair, torch_hook_count

CLASSES = ("clear", "unclear", "silent", "lost")
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "hardening.md"
HOOK = "blocks.0.hook_resid_post"


class Lost(Exception):
    """Raised by a case's check when a result or the user's data is gone; the message says what."""


class CliFailed(Exception):
    """A command line that ended with a non-zero status; the message is what it printed on stderr."""

    def __init__(self, status: int, stderr: str) -> None:
        super().__init__(stderr.strip())
        self.status = status


@dataclass(frozen=True)
class Case:
    """One bad input: ``run(env)`` feeds it to mechscope.

    - ``words``: what the message (or the warning, for ``warns``) must contain, case-insensitively;
    - ``errors``: the exception types a clear answer may raise;
    - ``warns``: a warning naming ``words`` (and no error) is the right answer;
    - ``accept``: taking the input (storing what can be stored) is the right answer, given ``lost`` finds nothing;
    - ``lost(env)``: called after the run (whatever it did); raises :class:`Lost` when data is gone;
    - ``open``: the file that still has to fix this case (it is not clear yet); empty once fixed.
    """

    kind: str
    input: str
    run: Callable[[Env], Any]
    words: tuple[str, ...] = ()
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, KeyError)
    warns: bool = False
    accept: bool = False
    lost: Callable[[Env], None] | None = None
    open: str = ""


@dataclass
class Outcome:
    case: Case
    cls: str
    got: str  # one line: what it gives now


# ---- the environment: tiny models and files, built once, a fresh folder per case ------------------------------


class Env:
    """Tiny random models, a saved model folder and SAE, built on first use; ``tmp`` is a fresh folder per case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root
        self._n = 0

    def fresh(self) -> Path:
        self._n += 1
        self.tmp = self.root / f"case{self._n:04d}"
        self.tmp.mkdir()
        return self.tmp

    @cached_property
    def llama(self):
        return build_pair("llama", seed=1)[0]

    @cached_property
    def small(self):
        """A 1-layer llama small enough to save, load and run pipelines on in milliseconds."""
        torch.manual_seed(0)
        return HookedModel(
            HookedAutoConfig(
                "llama",
                num_hidden_layers=1,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=300,
            )
        )

    @cached_property
    def saved(self) -> Path:
        """The small model saved with its tokenizer."""
        folder = self.root / "saved_model"
        self.small.model.save_pretrained(folder)
        self.small.tokenizer.save_pretrained(folder)
        return folder

    @cached_property
    def sae(self):
        torch.manual_seed(0)
        return SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name=HOOK))

    @cached_property
    def sae_dir(self) -> Path:
        return save_sae(self.sae, self.root / "sae")

    def sae_copy(self) -> Path:
        """A copy of the saved SAE in this case's folder, to damage."""
        return Path(shutil.copytree(self.sae_dir, self.tmp / "sae"))

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.saved, self.tmp / "model"))

    @cached_property
    def checkpoint_run(self) -> Path:
        """A training run of the small SAE stopped after 2 steps, with its checkpoint."""
        out = self.root / "train_run"
        train_sae(self.train_config(out), store=Rows(16), stop_after=2)
        return out

    def train_config(self, out: Path, **changes: Any):
        settings = dict(
            model="tiny",
            hook_name=HOOK,
            n_tokens=64 * 8,
            batch_size_tokens=64,
            d_sae=32,
            k=4,
            out_dir=str(out),
            progress=False,
            warmup_steps=1,
            shuffle_buffer=0,
            checkpoint_seconds=0,
            checkpoint_every=1,
            log_every=1,
        )
        return TrainConfig(**{**settings, **changes})

    @cached_property
    def count_run(self) -> Path:
        """A finished co-occurrence count of the small model and SAE (2 batches)."""
        out = self.root / "count_run"
        pipeline.run_count(self.cooc_config(out), model=self.small, sae={HOOK: self.sae})
        return out

    def cooc_config(self, out: Path, **counting: Any):
        settings = dict(
            model=str(self.saved),
            sae=str(self.sae_dir),
            n_batches=2,
            batch_size_tokens=32,
            context_length=16,
            batch_contexts=2,
        )
        return CoocConfig(results_dir=str(out), counting=CountingConfig(**{**settings, **counting}))


class Rows:
    """A batch source of random ``[rows, d]`` activations at :data:`HOOK` (what ``train_sae`` reads)."""

    def __init__(self, d: int) -> None:
        self.d = d

    def batches(self, batch_size: int, n_tokens: int | None = None, shuffle_buffer: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        for _ in range((n_tokens or batch_size * 8) // batch_size):
            yield {HOOK: torch.randn(batch_size, self.d, generator=g)}


# ---- running and classifying ---------------------------------------------------------------------------------


_RUN_ID = re.compile(r"\d{8}T\d{6}\.\d+Z-[0-9a-f]{8}")


def _one_line(text: str, width: int = 160) -> str:
    """``text`` on one line, at most ``width`` characters, with the sweep's temporary folder shown as ``<tmp>``
    and experiment run ids as ``<run id>`` (so that the page is the same on every run)."""
    text = " ".join(str(text).split())
    text = _RUN_ID.sub("<run id>", re.sub(r"/tmp/mechscope-sweep-[^/ ]+", "<tmp>", text))
    return text if len(text) <= width else text[: width - 1] + "…"


def _has_words(text: str, words: tuple[str, ...]) -> list[str]:
    """The words missing from ``text`` (case-insensitive)."""
    low = text.lower()
    return [w for w in words if w.lower() not in low]


def classify(case: Case, env: Env) -> Outcome:
    """Run ``case`` in a fresh folder and classify what it did."""
    env.fresh()
    error: BaseException | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run(env)
        except (Exception, SystemExit) as e:  # SystemExit: argparse's exit on an unknown option
            error = e
    warned = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    if case.lost is not None:
        try:
            case.lost(env)
        except Lost as e:
            return Outcome(case, "lost", _one_line(f"lost: {e}"))
    if error is not None:
        message = str(error) if not isinstance(error, KeyError) or not error.args else str(error.args[0])
        got = _one_line(f"{type(error).__name__}: {message}")
        if isinstance(error, Lost):
            return Outcome(case, "lost", _one_line(f"lost: {message}"))
        if case.warns or case.accept:
            return Outcome(case, "unclear", got)
        if not isinstance(error, case.errors):
            return Outcome(case, "unclear", got)
        missing = _has_words(message, case.words)
        if missing or "Traceback" in message or len(message) > 700:
            return Outcome(case, "unclear", got + (f"  [missing: {', '.join(missing)}]" if missing else ""))
        return Outcome(case, "clear", got)
    if case.warns:
        good = [w for w in warned if not _has_words(w, case.words)]
        if good:
            return Outcome(case, "clear", _one_line(f"warning: {good[0]}"))
        return Outcome(case, "silent", _one_line("accepted" + (f"; warning: {warned[0]}" if warned else "")))
    if case.accept:
        missing = _has_words(" ".join(warned), case.words) if case.words else []
        if missing:
            return Outcome(case, "unclear", _one_line(f"kept, but no warning naming {', '.join(missing)}"))
        return Outcome(case, "clear", _one_line("kept" + (f"; warning: {warned[0]}" if warned else "")))
    return Outcome(case, "silent", _one_line("accepted, no error" + (f"; warning: {warned[0]}" if warned else "")))


def run_cases(cases: list[Case]) -> list[Outcome]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mechscope-sweep-") as root:
        env = Env(Path(root))
        try:
            return [classify(case, env) for case in cases]
        finally:
            for path in Path(root).rglob("*"):  # cases make folders read-only; let the clean-up remove them
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        path.chmod(0o700)


# ---- helpers the cases share ----------------------------------------------------------------------------------


def cli(*argv: str) -> None:
    """Run ``mechscope ARGV`` in this process; a non-zero status raises :class:`CliFailed` with its stderr."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = cli_main(list(argv))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 2
    if status:
        # what it printed from its first line of its own on (progress bars of a model load come before)
        lines = err.getvalue().replace("\r", "\n").splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith(("mechscope", "usage:"))), 0)
        raise CliFailed(status, "\n".join(lines[first:]))


def read_only(path: Path) -> Path:
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return path


def toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garbage(path: Path, size: int = 64) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(size))
    return path


def still_there(path_of: Callable[[Env], Path], text: str) -> Callable[[Env], None]:
    """A ``lost`` check: the file ``path_of(env)`` still holds ``text``."""

    def check(env: Env) -> None:
        path = path_of(env)
        if not path.is_file() or path.read_text() != text:
            raise Lost(f"{path.name} was deleted or overwritten")

    return check


# ---- the cases, by kind ----------------------------------------------------------------------------------------

ACCEPTED = ("accepted",)


def token_cases() -> Iterator[Case]:
    """Token input to every entry point that takes it (forward, to_tokens, generate, run_with_cache, tools)."""
    bad: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = [
        ("float tensor [[1.7, 2.2]]", lambda: torch.tensor([[1.7, 2.2]]), (".long()",)),
        ("bool tensor", lambda: torch.tensor([[True, False]]), (".long()",)),
        ("complex tensor", lambda: torch.tensor([[1 + 1j]]), ("integer",)),
        ("numpy float array", lambda: np.array([[1.0, 2.0]]), ACCEPTED),
        ("numpy bool array", lambda: np.array([[True, False]]), ACCEPTED),
        ("numpy object array", lambda: np.array([[1, "a"]], dtype=object), ACCEPTED),
        ("numpy 3-D int array", lambda: np.ones((2, 2, 3), dtype=np.int64), ("[batch, pos]",)),
        ("bytes b'hi'", lambda: b"hi", ("decode",)),
        ("bytearray", lambda: bytearray(b"hi"), ACCEPTED),
        ("list of bool", lambda: [True, False], ACCEPTED),
        ("list of float", lambda: [1.5, 2.0], ACCEPTED),
        ("list mixing int and str", lambda: [1, "a"], ACCEPTED),
        ("ragged nested list [[1, 2], [3]]", lambda: [[1, 2], [3]], ACCEPTED),
        ("list of lists of str", lambda: [["a"], ["b"]], ACCEPTED),
        ("float scalar 3.5", lambda: 3.5, ACCEPTED),
        ("None", lambda: None, ACCEPTED),
        ("dict {'input_ids': ...}", lambda: {"input_ids": [1, 2]}, ACCEPTED),
        ("set of ints", lambda: {1, 2}, ACCEPTED),
        ("3-D long tensor", lambda: torch.ones(2, 2, 3, dtype=torch.long), ("[batch, pos]",)),
        ("0-D tensor", lambda: torch.tensor(5), ("reshape(1, 1)",)),
        ("id past the vocabulary (50257)", lambda: torch.tensor([[1, 50257]]), ("50257", "0..50256")),
        ("negative id -3", lambda: [1, -3], ("-3", "0..50256")),
        ("empty list", lambda: [], ("empty",)),
        ("empty tensor (1, 0)", lambda: torch.zeros(1, 0, dtype=torch.long), ("empty",)),
        ("empty prompt ''", lambda: "", ("no tokens",)),
        ("one empty prompt of two", lambda: ["ab", ""], ("text 1", "no tokens")),
        ("513 tokens (n_ctx 512)", lambda: torch.zeros(1, 513, dtype=torch.long), ("n_ctx = 512", "truncate")),
    ]
    entries: list[tuple[str, Callable[[Any, Any], Any]]] = [
        ("forward", lambda m, x: m(x)),
        ("run_with_cache", lambda m, x: m.run_with_cache(x, names_filter=HOOK)),
        ("generate", lambda m, x: m.generate(x, max_new_tokens=1, do_sample=False)),
    ]
    for what, make, words in bad:
        for entry, call in entries:
            if entry != "forward" and what not in (
                "float tensor [[1.7, 2.2]]",
                "3-D long tensor",
                "bytes b'hi'",
                "empty prompt ''",
                "numpy float array",
                "id past the vocabulary (50257)",
            ):
                continue
            yield Case("tokens", f"{entry}({what})", lambda env, c=call, x=make: c(env.llama, x()), words)
    yield Case("tokens", "to_tokens(list of float)", lambda env: env.llama.to_tokens([1.5, 2.0]), ACCEPTED)
    yield Case(
        "tokens", "to_str_tokens(batch of 2)", lambda env: env.llama.to_str_tokens(["ab", "cd"]), ("single sequence",)
    )
    yield Case("tokens", "to_string(float tensor)", lambda env: env.llama.to_string(torch.tensor([1.5])), ("integer",))
    yield Case(
        "tokens", "to_string(id past the vocabulary)", lambda env: env.llama.to_string([50300]), ("50300", "0..50256")
    )
    yield Case("tokens", "to_string(negative id)", lambda env: env.llama.to_string([-1]), ("-1", "0..50256"))
    yield Case(
        "tokens",
        "to_string(3-D tensor)",
        lambda env: env.llama.to_string(torch.ones(1, 1, 2).long()),
        ("[batch, pos]",),
    )
    yield Case(
        "tokens",
        "to_tokens(padding_side='middle')",
        lambda env: env.llama.to_tokens(["a", "abc"], padding_side="middle"),
        ("padding_side", "left", "right"),
    )
    yield Case(
        "tokens",
        "forward(prepend_bos='yes')",
        lambda env: env.llama("ab", prepend_bos="yes"),
        ("prepend_bos", "True", "False"),
    )


def forward_cases() -> Iterator[Case]:
    """forward's other arguments: stop_at_layer, return_type, attention_mask."""
    for bad in (1.0, "1", True, torch.tensor(1.0)):
        yield Case(
            "forward",
            f"stop_at_layer={bad!r}",
            lambda env, b=bad: env.llama("hi", stop_at_layer=b),
            ("stop_at_layer", "int(value)"),
        )
    for bad in (3, -3, 100):
        yield Case(
            "forward",
            f"stop_at_layer={bad} (2 layers)",
            lambda env, b=bad: env.llama("hi", stop_at_layer=b),
            ("stop_at_layer", "-2..2"),
        )
    yield Case(
        "forward", "return_type='logit'", lambda env: env.llama("hi", return_type="logit"), ("return_type", "'logits'")
    )
    yield Case(
        "forward",
        "attention_mask of another shape",
        lambda env: env.llama(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2)),
        ("attention_mask", "shape"),
    )
    yield Case(
        "forward",
        "attention_mask with a 2",
        lambda env: env.llama(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 2, 1]])),
        ("0 and 1",),
    )
    yield Case(
        "forward",
        "attention_mask as a list",
        lambda env: env.llama(torch.tensor([[1, 2, 3]]), attention_mask=[[1, 1, 1]]),
        ("torch tensor",),
    )
    yield Case(
        "forward",
        "attention_mask all zeros in a row",
        lambda env: env.llama(torch.tensor([[1, 2, 3]]), attention_mask=torch.zeros(1, 3, dtype=torch.long)),
        ("attention_mask", "no real token"),
    )
    yield Case(
        "forward",
        "run_with_cache(dtype='float16')",
        lambda env: env.llama.run_with_cache("hi", names_filter=HOOK, dtype="float16"),
        ("dtype", "torch.dtype"),
    )
    yield Case(
        "forward",
        "run_with_cache(device='gpu')",
        lambda env: env.llama.run_with_cache("hi", names_filter=HOOK, device="gpu"),
        ("device", "'gpu'"),
    )
    yield Case(
        "forward",
        "run_with_cache(unknown keyword colour=1)",
        lambda env: env.llama.run_with_cache("hi", colour=1),
        ("colour",),
    )


def hook_cases() -> Iterator[Case]:
    """Hooks that return another dtype/device/shape/type, names that match nothing, bad directions."""

    def run_edit(edit: Callable[[torch.Tensor], Any]) -> Callable[[Env], Any]:
        def my_edit(t, hook):
            return edit(t)

        return lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[(HOOK, my_edit)])

    edits: list[tuple[str, Callable[[torch.Tensor], Any], tuple[str, ...]]] = [
        ("int64", lambda t: t.long(), ("my_edit", "dtype torch.int64", ".to(")),
        ("float64", lambda t: t.double(), ("my_edit", "torch.float64")),
        ("float16", lambda t: t.half(), ("my_edit", "torch.float16")),
        ("bool", lambda t: t > 0, ("my_edit", "torch.bool")),
        ("meta device", lambda t: t.to("meta"), ("my_edit", "device meta")),
        ("shape [..., :3]", lambda t: t[..., :3], ("my_edit", "shape (1, 2, 3)")),
        ("shape with a batch of 2", lambda t: t.expand(2, -1, -1), ("my_edit", "shape (2, 2, 64)")),
        ("a list", lambda t: [t], ("my_edit", "list", "tensor")),
        ("a float", lambda t: 1.0, ("my_edit", "float", "tensor")),
        ("a numpy array", lambda t: t.detach().numpy(), ("my_edit", "ndarray", "tensor")),
        ("a tuple (t, t)", lambda t: (t, t), ("my_edit", "tuple", "tensor")),
    ]
    for what, edit, words in edits:
        yield Case("hooks", f"forward hook returns {what}", run_edit(edit), words)

    def bwd(edit: Callable[[torch.Tensor], Any]) -> Callable[[Env], Any]:
        def my_grad_edit(grad, hook):
            return edit(grad)

        def run(env: Env) -> None:
            try:
                env.llama.run_with_hooks("hi", bwd_hooks=[(HOOK, my_grad_edit)]).sum().backward()
            finally:
                env.llama.zero_grad(set_to_none=True)

        return run

    for what, edit, words in (
        ("shape", lambda g: g[..., :3], ("my_grad_edit", "shape (1, 2, 3)", "gradient")),
        ("dtype", lambda g: g.double(), ("my_grad_edit", "dtype")),
        ("a list", lambda g: [g], ("my_grad_edit", "list")),
    ):
        yield Case("hooks", f"backward hook returns {what}", bwd(edit), words)

    def typo(name: str) -> bool:
        return name.endswith("hook_resid_middle")

    yield Case(
        "hooks",
        "names_filter predicate matching nothing",
        lambda env: env.llama.run_with_cache("hi", names_filter=typo),
        ("'typo' matches no hook point", "hook_resid"),
    )
    yield Case(
        "hooks",
        "fwd_hooks predicate matching nothing",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[(typo, lambda t, hook: None)]),
        ("matches no hook point",),
    )
    yield Case(
        "hooks",
        "names_filter='blocks.0.hook_resid_pst' (typo)",
        lambda env: env.llama.run_with_cache("hi", names_filter="blocks.0.hook_resid_pst"),
        ("blocks.0.hook_resid_post",),
    )
    yield Case(
        "hooks",
        "names_filter list with an unknown name",
        lambda env: env.llama.run_with_cache("hi", names_filter=[HOOK, "blocks.0.hook_nope"]),
        ("blocks.0.hook_nope",),
    )
    yield Case(
        "hooks",
        "names_filter=[] (empty list)",
        lambda env: env.llama.run_with_cache("hi", names_filter=[]),
        ("names_filter", "empty"),
    )
    yield Case(
        "hooks",
        "names_filter=3 (an int)",
        lambda env: env.llama.run_with_cache("hi", names_filter=3),
        ("names_filter", "int"),
    )
    yield Case(
        "hooks",
        "hook at blocks.9 (2 layers)",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[("blocks.9.hook_resid_post", lambda t, hook: None)]),
        ("blocks.9", "0..1"),
    )
    yield Case(
        "hooks",
        "hook name 'resid_post' without a layer",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[("resid_post", lambda t, hook: None)]),
        ("resid_post",),
    )
    yield Case(
        "hooks",
        "hook function not callable",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[(HOOK, "not a function")]),
        ("hook function", "callable", "str"),
    )
    yield Case(
        "hooks",
        "fwd_hooks entry not a pair",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[HOOK]),
        ("fwd_hooks", "(name, hook)"),
    )
    yield Case(
        "hooks",
        "add_hook(dir='sideways')",
        lambda env: env.llama.add_hook(HOOK, lambda t, hook: None, dir="sideways"),
        ("'fwd'", "'bwd'"),
        lost=lambda env: _reset(env),
    )
    yield Case(
        "hooks",
        "hook_shape('blocks.0.hook_nope')",
        lambda env: env.llama.hook_shape("blocks.0.hook_nope"),
        ("blocks.0.hook_nope",),
    )
    yield Case(
        "hooks",
        "hook_shape(attention pattern)",
        lambda env: env.llama.hook_shape("blocks.0.attn.hook_pattern"),
        ("attention map",),
    )
    yield Case("hooks", "block_part(0, 'mlpp')", lambda env: env.llama.block_part(0, "mlpp"), ("mlpp", "attn"))
    yield Case("hooks", "block_part(5, 'mlp') (2 layers)", lambda env: env.llama.block_part(5, "mlp"), ("5", "0..1"))
    yield Case(
        "hooks",
        "a hook raising inside the forward",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[(HOOK, _raising_hook)]),
        ("boom",),
        errors=(RuntimeError,),
        lost=lambda env: _no_hooks_left(env),
    )


def _raising_hook(t: torch.Tensor, hook: Any) -> None:
    raise RuntimeError("boom")


def _reset(env: Env) -> None:
    env.llama.reset_hooks()


def _no_hooks_left(env: Env) -> None:
    before = torch_hook_count(env.llama.model)
    env.llama.reset_hooks()
    if before != torch_hook_count(env.llama.model):
        raise Lost("a hook stayed attached after the error")


def generate_cases() -> Iterator[Case]:
    settings: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"max_new_tokens": -1}, ("max_new_tokens", ">= 0")),
        ({"max_new_tokens": 2.5}, ("max_new_tokens", "int")),
        ({"max_new_tokens": "5"}, ("max_new_tokens", "int")),
        ({"temperature": -1.0}, ("temperature", ">= 0")),
        ({"temperature": float("nan")}, ("temperature", "finite")),
        ({"temperature": "hot"}, ("temperature", "number")),
        ({"top_p": 1.5}, ("top_p", "(0, 1]")),
        ({"top_p": 0.0}, ("top_p", "(0, 1]")),
        ({"top_p": float("nan")}, ("top_p", "(0, 1]")),
        ({"top_k": -1}, ("top_k", ">= 1")),
        ({"top_k": 0}, ("top_k", ">= 1")),
        ({"top_k": 2.5}, ("top_k", "int")),
        ({"seed": "abc"}, ("seed", "int")),
        ({"seed": 1.5}, ("seed", "int")),
    ]
    for extra, words in settings:
        for do_sample in (True, False):
            yield Case(
                "generate",
                f"generate({_kw(extra)}, do_sample={do_sample})",
                lambda env, e=extra, d=do_sample: env.llama.generate("hi", **{"max_new_tokens": 1, **e}, do_sample=d),
                words,
            )
    yield Case(
        "generate",
        "generate(do_sample='yes')",
        lambda env: env.llama.generate("hi", max_new_tokens=1, do_sample="yes"),
        ("do_sample", "True or False"),
    )
    yield Case(
        "generate",
        "prompt of 500 + 20 new tokens (n_ctx 512)",
        lambda env: env.llama.generate(torch.zeros(1, 500, dtype=torch.long), max_new_tokens=20),
        ("n_ctx = 512", "max_new_tokens"),
    )


def _kw(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


def model_config_cases() -> Iterator[Case]:
    yield Case(
        "model config",
        "HookedAutoConfig('llama', num_layerz=3)",
        lambda env: HookedAutoConfig("llama", num_layerz=3),
        ("num_layerz", "num_hidden_layers"),
    )
    yield Case(
        "model config", "HookedAutoConfig('llamma')", lambda env: HookedAutoConfig("llamma"), ("llamma", "llama")
    )
    yield Case("model config", "HookedAutoConfig('t5')", lambda env: HookedAutoConfig("t5"), ("t5", "llama"))
    yield Case(
        "model config",
        "HookedAutoConfig('llama', num_hidden_layers='2')",
        lambda env: _model_of(HookedAutoConfig("llama", num_hidden_layers="2")),
        ("num_hidden_layers", "int"),
    )
    yield Case(
        "model config",
        "HookedAutoConfig('llama', num_hidden_layers=0)",
        lambda env: _model_of(HookedAutoConfig("llama", num_hidden_layers=0)),
        ("num_hidden_layers", "at least 1"),
    )
    yield Case(
        "model config",
        "HookedAutoConfig('llama', hidden_size=10, heads 4)",
        lambda env: _model_of(HookedAutoConfig("llama", hidden_size=10, num_attention_heads=4)),
        ("hidden_size", "num_attention_heads"),
    )
    yield Case("model config", "HookedModel(a str)", lambda env: _hooked("llama"), ("from_pretrained",))
    yield Case("model config", "HookedModel(a T5 model)", lambda env: _hooked_t5(), ("t5", "llama"))
    yield Case(
        "model config",
        "HookedModel(llama, unknown option use_attn=True)",
        lambda env: _hooked_opts(use_attn=True),
        ("use_attn", "use_attn_in"),
    )


def _model_of(config: Any) -> Any:
    return HookedModel(config)


def _hooked(x: Any) -> Any:
    return HookedModel(x)


def _hooked_t5() -> Any:
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    return HookedModel(T5ForConditionalGeneration(t5))


def _hooked_opts(**options: Any) -> Any:
    return HookedModel.from_hf(
        AutoModelForCausalLM.from_config(
            HookedAutoConfig(
                "llama",
                num_hidden_layers=1,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=300,
            )
        ),
        **options,
    )


def loading_cases() -> Iterator[Case]:
    def load(path_of: Callable[[Env], Any], **kwargs: Any) -> Callable[[Env], Any]:
        return lambda env: HookedModel.from_pretrained(str(path_of(env)), **kwargs)

    yield Case("loading", "a path that does not exist", load(lambda env: env.tmp / "nope"), ("does not exist",))
    yield Case(
        "loading", "a relative ./path that does not exist", load(lambda env: "./no/such/model/dir"), ("does not exist",)
    )
    yield Case("loading", "a .gguf file that does not exist", load(lambda env: env.tmp / "x.gguf"), ("does not exist",))
    yield Case("loading", "an empty folder", load(lambda env: env.tmp), ("no config.json", "save_pretrained"))
    yield Case(
        "loading",
        "a folder without tokenizer files",
        load(lambda env: _no_tokenizer(env)),
        ("tokenizer.save_pretrained",),
        warns=True,
    )
    yield Case(
        "loading",
        "a folder without weights",
        load(lambda env: _without(env, "model.safetensors")),
        ("model.safetensors",),
    )
    yield Case(
        "loading",
        "config.json path instead of its folder",
        load(lambda env: env.saved / "config.json"),
        (),
        accept=True,
    )
    yield Case(
        "loading",
        "model.safetensors path instead of its folder",
        load(lambda env: env.model_copy() / "model.safetensors"),
        ("is a file", "folder"),
    )
    yield Case(
        "loading",
        "a truncated model.safetensors",
        load(lambda env: _damaged(env, truncate)),
        ("model.safetensors", "truncated or damaged"),
    )
    yield Case(
        "loading", "random bytes as model.safetensors", load(lambda env: _damaged(env, garbage)), ("model.safetensors",)
    )
    yield Case(
        "loading", "a truncated config.json", load(lambda env: _damaged(env, truncate, "config.json")), ("config.json",)
    )
    yield Case(
        "loading",
        "config.json without model_type",
        load(lambda env: _edited_config(env, model_type=None)),
        ("config.json", "model_type"),
    )
    yield Case(
        "loading",
        "a garbage .gguf",
        load(lambda env: garbage(env.tmp / "garbage.gguf")),
        ("not a readable GGUF", "convert"),
    )
    yield Case("loading", "an empty .gguf", load(lambda env: _touch(env.tmp / "empty.gguf")), ("not a readable GGUF",))
    yield Case(
        "loading", "a T5 (encoder-decoder) folder", load(lambda env: _t5_folder(env)), ("encoder-decoder", "llama")
    )
    for dtype in ("float31", "int8", "auto", torch.int64, 16):
        yield Case(
            "loading", f"dtype={dtype!r}", load(lambda env: env.saved, dtype=dtype), ("unknown dtype", "'float32'")
        )
    yield Case("loading", "device='cuda:7'", load(lambda env: env.saved, device="cuda:7"), ("cuda:7", "cpu"))
    yield Case("loading", "device='gpu'", load(lambda env: env.saved, device="gpu"), ("gpu", "cpu"))
    yield Case(
        "loading",
        "a hub id while offline",
        load(lambda env: "nobody-here/no-such-model"),
        ("nobody-here/no-such-model", "offline"),
    )
    yield Case(
        "loading",
        "from_pretrained(unknown keyword colour=1)",
        load(lambda env: env.saved, colour=1),
        ("colour", "from_pretrained"),
    )


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _no_tokenizer(env: Env) -> Path:
    bare = env.tmp / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(env.saved / name, bare / name)
    return bare


def _without(env: Env, name: str) -> Path:
    folder = env.model_copy()
    (folder / name).unlink()
    return folder


def _damaged(env: Env, how: Callable[[Path], Path], name: str = "model.safetensors") -> Path:
    folder = env.model_copy()
    how(folder / name)
    return folder


def _edited_config(env: Env, **changes: Any) -> Path:
    folder = env.model_copy()
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _t5_folder(env: Env) -> Path:
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    AutoModelForSeq2SeqLM.from_config(t5).save_pretrained(env.tmp / "t5")
    return env.tmp / "t5"


def sae_cases() -> Iterator[Case]:
    def edit_weights(env: Env, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        folder = env.sae_copy()
        file = folder / "sae_weights.safetensors"
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file)
        return folder

    def edit_cfg(env: Env, **changes: Any) -> Path:
        folder = env.sae_copy()
        cfg = json.loads((folder / "cfg.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "cfg.json").write_text(json.dumps(cfg))
        return folder

    def loads(path_of: Callable[[Env], Path], **kwargs: Any) -> Callable[[Env], Any]:
        return lambda env: load_sae(path_of(env), **kwargs)

    def nan(t: dict[str, torch.Tensor], name: str, value: float) -> None:
        t[name].view(-1)[3] = value

    for name in ("W_enc", "W_dec", "b_dec", "b_enc"):
        yield Case(
            "sae files",
            f"{name} with a NaN",
            loads(lambda env, n=name: edit_weights(env, lambda t: nan(t, n, float("nan")))),
            (name, "NaN"),
        )
    yield Case(
        "sae files",
        "W_enc with +inf",
        loads(lambda env: edit_weights(env, lambda t: nan(t, "W_enc", float("inf")))),
        ("W_enc", "infinite"),
    )
    yield Case(
        "sae files",
        "W_enc of the wrong shape",
        loads(lambda env: edit_weights(env, lambda t: t.update(W_enc=t["W_enc"][:, :5].contiguous()))),
        ("W_enc", "shape"),
    )
    yield Case(
        "sae files",
        "W_dec transposed",
        loads(lambda env: edit_weights(env, lambda t: t.update(W_dec=t["W_dec"].T.contiguous()))),
        ("W_dec", "shape"),
    )
    yield Case("sae files", "b_dec missing", loads(lambda env: edit_weights(env, lambda t: t.pop("b_dec"))), ("b_dec",))
    yield Case(
        "sae files",
        "an extra tensor",
        loads(lambda env: edit_weights(env, lambda t: t.update(extra=torch.zeros(2)))),
        ("extra",),
    )
    yield Case(
        "sae files",
        "W_enc stored as int64",
        loads(lambda env: edit_weights(env, lambda t: t.update(W_enc=t["W_enc"].long()))),
        ("W_enc", "int64"),
    )
    yield Case(
        "sae files", "cfg.json d_in disagrees with W_enc", loads(lambda env: edit_cfg(env, d_in=17)), ("d_in", "17")
    )
    yield Case("sae files", "cfg.json without d_sae", loads(lambda env: edit_cfg(env, d_sae=None)), ("d_sae",))
    yield Case(
        "sae files", "cfg.json architecture 'gated'", loads(lambda env: edit_cfg(env, architecture="gated")), ("gated",)
    )
    yield Case("sae files", "cfg.json k = -1", loads(lambda env: edit_cfg(env, k=-1)), ("k", "-1"))
    yield Case("sae files", "cfg.json dtype 'float8'", loads(lambda env: edit_cfg(env, dtype="float8")), ("float8",))
    yield Case(
        "sae files", "cfg.json a JSON list", loads(lambda env: _json_list(env.sae_copy() / "cfg.json")), ("cfg.json",)
    )
    yield Case(
        "sae files",
        "truncated sae_weights.safetensors",
        loads(lambda env: _sae_damaged(env, "sae_weights.safetensors")),
        ("sae_weights.safetensors", "truncated", "again"),
    )
    yield Case(
        "sae files",
        "truncated cfg.json",
        loads(lambda env: _sae_damaged(env, "cfg.json")),
        ("cfg.json", "truncated", "again"),
    )
    yield Case("sae files", "an empty folder", loads(lambda env: env.tmp), ("holds no SAE",))
    yield Case("sae files", "a path that does not exist", loads(lambda env: env.tmp / "nope"), ("does not exist",))
    yield Case("sae files", "a text file", loads(lambda env: toml(env.tmp / "sae.txt", "hello")), ("not an SAE file",))
    yield Case("sae files", "a truncated params.npz", loads(lambda env: _npz(env, truncated=True)), ("params.npz",))
    yield Case(
        "sae files", "params.npz missing W_dec", loads(lambda env: _npz(env, drop="W_dec")), ("params.npz", "W_dec")
    )
    yield Case("sae files", "load_sae(dtype='int8')", loads(lambda env: env.sae_dir, dtype="int8"), ("int8",))
    yield Case("sae files", "load_sae(device='gpu')", loads(lambda env: env.sae_dir, device="gpu"), ("gpu",))
    yield Case(
        "sae files",
        "save_sae over an existing SAE",
        lambda env: _save_twice(env),
        ("overwrite",),
        lost=lambda env: _sae_intact(env),
    )
    yield Case("sae files", "SAEConfig(d_sae=0)", lambda env: SAEConfig(d_in=4, d_sae=0), ("d_sae",))
    yield Case(
        "sae files",
        "SAEConfig(architecture='gated')",
        lambda env: SAEConfig(d_in=4, d_sae=8, architecture="gated"),
        ("gated", "topk"),
    )
    yield Case(
        "sae files", "SAEConfig(topk, k=0)", lambda env: SAEConfig(d_in=4, d_sae=8, architecture="topk", k=0), ("k",)
    )
    yield Case(
        "sae files",
        "SAEConfig(hook_name=3)",
        lambda env: SAEConfig(d_in=4, d_sae=8, hook_name=3),
        ("hook_name", "str"),
    )
    yield Case(
        "sae files",
        "SAEConfig(model_name=['m'])",
        lambda env: SAEConfig(d_in=4, d_sae=8, model_name=["m"]),
        ("model_name", "str"),
    )
    yield Case(
        "sae files", "SAEConfig(device='gpu')", lambda env: SAEConfig(d_in=4, d_sae=8, device="gpu"), ("device", "gpu")
    )
    yield Case(
        "sae files",
        "SAEConfig(apply_b_dec_to_input='yes')",
        lambda env: SAEConfig(d_in=4, d_sae=8, apply_b_dec_to_input="yes"),
        ("apply_b_dec_to_input", "True or False"),
    )
    yield Case(
        "sae files",
        "SAEConfig(scaling_factor=nan, expected_average)",
        lambda env: SAEConfig(
            d_in=4, d_sae=8, normalize_activations="expected_average_only_in", scaling_factor=float("nan")
        ),
        ("scaling_factor",),
    )
    yield Case(
        "sae files", "sae.encode of the wrong width", lambda env: env.sae.encode(torch.randn(3, 7)), ("7", "d_in", "16")
    )
    yield Case(
        "sae files",
        "sae.encode of an int tensor",
        lambda env: env.sae.encode(torch.ones(3, 16).long()),
        ("dtype", "int64"),
    )
    yield Case(
        "sae files",
        "sae.decode of the wrong width",
        lambda env: env.sae.decode(torch.randn(3, 7)),
        ("7", "d_sae", "32"),
    )


def _json_list(path: Path) -> Path:
    path.write_text("[1, 2]")
    return path.parent


def _sae_damaged(env: Env, name: str) -> Path:
    folder = env.sae_copy()
    truncate(folder / name)
    return folder


def _npz(env: Env, truncated: bool = False, drop: str | None = None) -> Path:
    sae = env.sae
    arrays = {
        "W_enc": sae.W_enc.detach().numpy(),
        "W_dec": sae.W_dec.detach().numpy(),
        "b_enc": sae.b_enc.detach().numpy(),
        "b_dec": sae.b_dec.detach().numpy(),
        "threshold": np.zeros(sae.cfg.d_sae, dtype=np.float32),
    }
    if drop:
        arrays.pop(drop)
    path = env.tmp / "params.npz"
    np.savez(path, **arrays)
    if truncated:
        truncate(path)
    return path


def _save_twice(env: Env) -> None:
    folder = env.sae_copy()

    save_sae(SparseAutoencoder(SAEConfig(d_in=16, d_sae=8)), folder)


def _sae_intact(env: Env) -> None:
    if not torch.equal(load_sae(env.tmp / "sae").W_enc, env.sae.W_enc):
        raise Lost("the SAE already in the folder was replaced")


# ---- configs: every field of every config gets a wrong type and, for numbers, harmful values -------------------


def _configs() -> list[tuple[str, type, dict[str, Any]]]:
    """(name, config class, the smallest settings that build it)."""
    settings_cls = typing.get_type_hints(DashboardsConfig)["dashboards"]
    return [
        ("TrainConfig", TrainConfig, {}),
        ("CountingConfig", CountingConfig, {"model": "m"}),
        ("AnalysisConfig", AnalysisConfig, {}),
        ("PCAConfig", PCAConfig, {}),
        ("CoocConfig", CoocConfig, {"counting": CountingConfig(model="m")}),
        ("DashboardsConfig", DashboardsConfig, {"sae": "s"}),
        (settings_cls.__name__, settings_cls, {}),
        ("MainJobConfig", MainJobConfig, {}),
    ]


# Fields whose harmful values are listed by hand: {(config, field): [(value, words)]}; every other numeric field
# gets nan and (ints) -1, unless -1 is meaningful (seeds).
NEGATIVE_OK = {"seed", "random_seed"}
EXTRA_VALUES: dict[tuple[str, str], list[tuple[Any, tuple[str, ...]]]] = {
    ("TrainConfig", "adam_beta1"): [(1.0, ("adam_beta1", "[0, 1)"))],
    ("TrainConfig", "adam_beta2"): [(1.5, ("adam_beta2", "[0, 1)"))],
    ("TrainConfig", "lr"): [(0.0, ("lr", "greater than 0"))],
    ("TrainConfig", "k"): [(0.0, ("k",)), (2.5, ("k", "whole number"))],
    ("TrainConfig", "d_sae"): [(0, ("d_sae", "at least 1"))],
    ("TrainConfig", "jumprelu_bandwidth"): [(0.0, ("jumprelu_bandwidth", "greater than 0"))],
    ("TrainConfig", "decay_fraction"): [(1.5, ("decay_fraction", "[0, 1]"))],
    ("TrainConfig", "architecture"): [("gated", ("architecture", "topk"))],
    ("TrainConfig", "dtype"): [("float8", ("dtype", "float32"))],
    ("TrainConfig", "device"): [("cuda:7", ("device", "cpu")), ("gpu", ("device", "cpu"))],
    ("TrainConfig", "out_dir"): [("", ("out_dir", "empty"))],
    ("TrainConfig", "model"): [("", ("model", "empty"))],
    ("TrainConfig", "n_tokens"): [(100, ("n_tokens", "less than one batch"))],
    ("CountingConfig", "activation_thresholds"): [
        ([], ("activation_thresholds", "empty")),
        ([-1.0], ("activation_thresholds", ">= 0")),
        ([0.5, 0.5], ("activation_thresholds", "duplicates")),
    ],
    ("CountingConfig", "context_length"): [(1, ("context_length", "at least 2"))],
    ("CountingConfig", "device"): [("cuda:7", ("device", "cpu"))],
    ("CountingConfig", "model"): [("", ("model", "empty"))],
    ("CountingConfig", "hook_names"): [
        ([], ("hook_names",)),
        ([HOOK, HOOK], ("hook_names", "distinct")),
        (["resid 3"], ("hook_names", "resid 3")),
    ],
    ("CountingConfig", "sae"): [({}, ("sae", "empty"))],
    ("AnalysisConfig", "min_subgraph_size"): [(300, ("min_subgraph_size", "max_subgraph_size"))],
    ("PCAConfig", "candidate_sizes"): [([], ("candidate_sizes", "empty")), ([1], ("candidate_sizes", "at least 2"))],
    ("CoocConfig", "results_dir"): [("", ("results_dir", "non-empty"))],
    ("CoocConfig", "output_format"): [("csv", ("output_format", "mechscope"))],
    ("DashboardsConfig", "device"): [("cuda:7", ("device", "cpu"))],
    ("DashboardsConfig", "hook_name"): [("resid 3", ("hook_name", "resid 3"))],
    ("DashboardsConfig", "out_dir"): [("", ("out_dir", "empty"))],
    ("MainJobConfig", "hook_name"): [("resid 3", ("hook_name", "resid 3"))],
    ("MainJobConfig", "stages"): [(["lookk"], ("stages", "lookk"))],
    ("MainJobConfig", "out_dir"): [("", ("out_dir", "empty"))],
}


def _wrong_type(hint: Any) -> Any:
    """A value of another type than ``hint`` allows."""
    for candidate in ([1.5], {"x": 1}, "text", 1.5, True):
        if not matches(candidate, hint):
            return candidate
    raise AssertionError(f"no wrong value for {hint}")


def config_cases() -> Iterator[Case]:
    for name, cls, base in _configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if _is_config(hint):
                yield Case(
                    "config fields",
                    f"{name}({f.name}=1)",
                    _build(cls, base, f.name, 1),
                    (f.name,),
                    errors=(ConfigError,),
                )
                continue
            bad = _wrong_type(hint)
            yield Case(
                "config fields",
                f"{name}({f.name}={bad!r})",
                _build(cls, base, f.name, bad),
                (f.name, "must be"),
                errors=(ConfigError,),
            )
            plain = without_none(hint)
            if plain in (int, float) and (name, f.name) not in EXTRA_VALUES:
                yield Case(
                    "config fields",
                    f"{name}({f.name}=nan)",
                    _build(cls, base, f.name, float("nan")),
                    (f.name,),
                    errors=(ConfigError,),
                )
                if f.name not in NEGATIVE_OK:
                    yield Case(
                        "config fields",
                        f"{name}({f.name}=-1)",
                        _build(cls, base, f.name, -1),
                        (f.name, "-1"),
                        errors=(ConfigError,),
                    )
            for value, words in EXTRA_VALUES.get((name, f.name), []):
                yield Case(
                    "config fields",
                    f"{name}({f.name}={value!r})",
                    _build(cls, base, f.name, value),
                    words,
                    errors=(ConfigError,),
                )


def _build(cls: type, base: dict[str, Any], name: str, value: Any) -> Callable[[Env], Any]:
    return lambda env: cls(**{**base, name: value})


def settings_cases() -> Iterator[Case]:
    """Reading a config from a TOML file (settings.load) and flags."""

    def load(text: str | None, cls: type = TrainConfig, **overrides: Any) -> Callable[[Env], Any]:
        def run(env: Env) -> Any:
            path = env.tmp / "run.toml"
            if text is not None:
                toml(path, text)
            return cls.from_toml(path, **overrides)

        return run

    yield Case("settings", "a TOML file that does not exist", load(None), ("run.toml", "does not exist"))
    yield Case("settings", "a TOML path that is a folder", lambda env: TrainConfig.from_toml(env.tmp), ("directory",))
    yield Case("settings", "invalid TOML", load("lr = = 3"), ("run.toml", "not valid TOML"), errors=(ConfigError,))
    yield Case("settings", "not UTF-8", lambda env: TrainConfig.from_toml(garbage(env.tmp / "x.toml")), ("x.toml",))
    yield Case("settings", "an unknown key lrr", load("lrr = 0.1"), ("lrr", "lr"), errors=(ConfigError,))
    yield Case("settings", "a key of the wrong type", load('lr = "fast"'), ("run.toml", "lr"), errors=(ConfigError,))
    yield Case(
        "settings",
        "a harmful value from a file",
        load("warmup_steps = -5"),
        ("run.toml", "warmup_steps"),
        errors=(ConfigError,),
    )
    yield Case(
        "settings", "an unknown table [trainn]", load("[trainn]\nk = 3", CoocConfig), ("trainn",), errors=(ConfigError,)
    )
    yield Case("settings", "a table where a value belongs", load("[lr]\nx = 1"), ("lr",), errors=(ConfigError,))
    yield Case(
        "settings",
        "a required key missing ([counting].sae)",
        load('[counting]\nmodel = "m"', CoocConfig),
        ("sae",),
        errors=(ConfigError,),
    )
    yield Case("settings", "an override of an unknown field", load("", lrr=0.1), ("lrr",), errors=(ConfigError,))
    yield Case("settings", "an override of the wrong type", load("", lr="x"), ("lr",), errors=(ConfigError,))


# ---- damaged files a job wrote earlier ----------------------------------------------------------------------------


def damaged_cases() -> Iterator[Case]:
    def resume_train(damage: Callable[[Path], Any]) -> Callable[[Env], Any]:
        def run(env: Env) -> Any:
            out = Path(shutil.copytree(env.checkpoint_run, env.tmp / "run"))
            damage(out / CHECKPOINT_DIR)
            return train_sae(env.train_config(out, resume=True), store=Rows(16), stop_after=3)

        return run

    words = ("delete", "out_dir")
    yield Case(
        "damaged files",
        "trainer.json truncated",
        resume_train(lambda c: truncate(c / TRAINER_JSON)),
        (TRAINER_JSON, *words),
    )
    yield Case(
        "damaged files",
        "trainer.json random bytes",
        resume_train(lambda c: garbage(c / TRAINER_JSON)),
        (TRAINER_JSON, *words),
    )
    yield Case(
        "damaged files",
        "trainer.json without step",
        resume_train(lambda c: _drop_key(c / TRAINER_JSON, "step")),
        (TRAINER_JSON, *words),
    )
    yield Case(
        "damaged files",
        "trainer.safetensors truncated",
        resume_train(lambda c: truncate(c / TRAINER_TENSORS)),
        (TRAINER_TENSORS, *words),
    )
    yield Case(
        "damaged files",
        "trainer.safetensors random bytes",
        resume_train(lambda c: garbage(c / TRAINER_TENSORS)),
        (TRAINER_TENSORS, *words),
    )
    yield Case(
        "damaged files",
        "checkpoint SAE weights truncated",
        resume_train(lambda c: truncate(c / "sae" / "sae_weights.safetensors")),
        ("sae_weights.safetensors",),
    )
    yield Case(
        "damaged files",
        "checkpoint folder emptied",
        resume_train(lambda c: [p.unlink() for p in c.rglob("*") if p.is_file()]),
        ("checkpoint",),
    )
    yield Case(
        "damaged files",
        "resume with other settings",
        lambda env: train_sae(
            env.train_config(Path(shutil.copytree(env.checkpoint_run, env.tmp / "run")), resume=True, d_sae=64),
            store=Rows(16),
        ),
        ("d_sae", "another out_dir"),
    )
    yield Case(
        "damaged files",
        "a new run where a checkpoint is",
        lambda env: train_sae(
            env.train_config(Path(shutil.copytree(env.checkpoint_run, env.tmp / "run"))), store=Rows(16)
        ),
        ("resume",),
        lost=lambda env: _checkpoint_kept(env),
    )

    def recount(damage: Callable[[Path], Any]) -> Callable[[Env], Any]:
        def run(env: Env) -> Any:
            out = Path(shutil.copytree(env.count_run, env.tmp / "count"))
            damage(out)
            return pipeline.run_count(env.cooc_config(out, n_batches=3), model=env.small, sae={HOOK: env.sae})

        return run

    def checkpoint_of(out: Path) -> Path:
        return out / layout.CHECKPOINT

    for what, damage in (("truncated", truncate), ("random bytes", garbage), ("empty", _touch)):
        yield Case(
            "damaged files",
            f"count_checkpoint.npz {what}",
            recount(lambda o, d=damage: d(_fake_checkpoint(o))),
            (layout.CHECKPOINT, "delete"),
        )
    yield Case(
        "damaged files",
        "a pickled count_checkpoint.npz",
        recount(lambda o: _pickled(_fake_checkpoint(o))),
        (layout.CHECKPOINT,),
    )

    def rerun_finished(damage: Callable[[Path], Any]) -> Callable[[Env], Any]:
        def run(env: Env) -> Any:
            out = Path(shutil.copytree(env.count_run, env.tmp / "count"))
            damage(out)
            counts = pipeline.run_count(env.cooc_config(out), model=env.small, sae={HOOK: env.sae})
            # accepted: the counts must then be back and equal to the finished ones
            fresh = pipeline.run_count(env.cooc_config(env.tmp / "fresh"), model=env.small, sae={HOOK: env.sae})
            for t, c in fresh[HOOK].items():
                if (counts[HOOK][t].counts != c.counts).nnz:
                    raise Lost("the recount differs from a fresh count")
            return counts

        return run

    def first_matrix(out: Path) -> Path:
        return next(p for p in (out / _hook_dir(out)).glob("mechscope_cooc_total_*.npz"))

    yield Case(
        "damaged files",
        "finished count, a matrix file deleted",
        rerun_finished(lambda o: first_matrix(o).unlink()),
        (),
        accept=True,
    )
    yield Case(
        "damaged files",
        "finished count, a matrix file truncated",
        rerun_finished(lambda o: truncate(first_matrix(o))),
        (),
        accept=True,
    )
    yield Case(
        "damaged files",
        "finished count, the n_tokens file damaged",
        rerun_finished(lambda o: garbage(o / _hook_dir(o) / layout.TOKENS_FILE)),
        (),
        accept=True,
    )
    yield Case(
        "damaged files",
        "graphs from a truncated count matrix",
        lambda env: _graphs_after(env, truncate),
        ("mechscope_cooc_", "count"),
    )
    yield Case(
        "damaged files",
        "graphs with no counts",
        lambda env: pipeline.run_graphs(env.cooc_config(env.tmp / "empty")),
        ("count",),
    )
    yield Case(
        "damaged files",
        "files.read_json of random bytes",
        lambda env: _read("json", garbage(env.tmp / "x.json")),
        ("x.json", "delete"),
    )
    yield Case(
        "damaged files",
        "files.read_npz of random bytes",
        lambda env: _read("npz", garbage(env.tmp / "x.npz")),
        ("x.npz", "delete"),
    )
    yield Case(
        "damaged files",
        "files.read_npz never advises allow_pickle",
        lambda env: _read("npz", _pickled(env.tmp / "p.npz")),
        ("p.npz",),
        lost=_no_pickle_advice,
    )
    yield Case(
        "damaged files",
        "files.read_safetensors truncated",
        lambda env: _read("safetensors", truncate(_tensors_file(env.tmp / "x.safetensors"))),
        ("x.safetensors", "delete"),
    )


def _no_pickle_advice(env: Env) -> None:
    try:
        files.read_npz(env.tmp / "p.npz")
    except Exception as e:  # the message is what we check
        if "allow_pickle" in str(e):
            raise Lost("the message advises allow_pickle=True") from None


def _hook_dir(out: Path) -> str:
    return next(p.name for p in out.iterdir() if p.is_dir() and any(p.glob("*.npz")))


def _fake_checkpoint(out: Path) -> Path:
    path = out / layout.CHECKPOINT
    np.savez(path, state=np.array([1, 2, 3]))
    return path


def _pickled(path: Path) -> Path:
    np.save(path.with_suffix(".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path.write_bytes(path.with_suffix(".npy").read_bytes())
    return path


def _tensors_file(path: Path) -> Path:
    save_file({"x": torch.arange(100.0)}, path)
    return path


def _read(kind: str, path: Path) -> Any:
    return {"json": files.read_json, "npz": files.read_npz, "safetensors": files.read_safetensors}[kind](path)


def _drop_key(path: Path, key: str) -> None:
    data = json.loads(path.read_text())
    data.pop(key)
    path.write_text(json.dumps(data))


def _checkpoint_kept(env: Env) -> None:
    if not (env.tmp / "run" / CHECKPOINT_DIR / TRAINER_JSON).is_file():
        raise Lost("the checkpoint was removed")


def _graphs_after(env: Env, damage: Callable[[Path], Any]) -> Any:
    out = Path(shutil.copytree(env.count_run, env.tmp / "count"))
    damage(next((out / _hook_dir(out)).glob("mechscope_cooc_total_*.npz")))
    return pipeline.run_graphs(env.cooc_config(out))


# ---- the command line ----------------------------------------------------------------------------------------------


def cli_cases() -> Iterator[Case]:
    def train_toml(env: Env, **changes: Any) -> str:
        settings = {
            "model": str(env.saved),
            "hook_name": HOOK,
            "n_tokens": 256,
            "batch_size_tokens": 64,
            "out_dir": str(env.tmp / "out"),
            "progress": False,
            **changes,
        }
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        return str(toml(env.tmp / "run.toml", "\n".join(lines)))

    def cooc_toml(env: Env, results_dir: str) -> str:
        return str(
            toml(
                env.tmp / "cooc.toml",
                f'results_dir = "{results_dir}"\n[counting]\nmodel = "{env.saved}"\n'
                f'sae = "{env.sae_dir}"\nn_batches = 1\n',
            )
        )

    def a_file(env: Env) -> Path:
        return toml(env.tmp / "taken", "my notes")

    yield Case(
        "cli",
        "sae train CONFIG (positional)",
        lambda env: cli("sae", "train", train_toml(env, warmup_steps=-5)),
        ("run.toml", "warmup_steps"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train with out_dir a file",
        lambda env: cli("sae", "train", train_toml(env, out_dir=str(a_file(env)))),
        ("out_dir", "is a file"),
        errors=(CliFailed,),
        lost=still_there(lambda env: env.tmp / "taken", "my notes"),
    )
    yield Case(
        "cli",
        "sae train with out_dir under a file",
        lambda env: cli("sae", "train", train_toml(env, out_dir=str(a_file(env) / "sub"))),
        ("out_dir", "under the file"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train with out_dir not writable (/proc)",
        lambda env: cli("sae", "train", train_toml(env, out_dir="/proc/mechscope-out")),
        ("out_dir", "not writable"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train --activations-dir a file",
        lambda env: cli("sae", "train", train_toml(env, activations_dir=str(a_file(env)))),
        ("activations_dir", "is a file"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train --lrr 0.1 (unknown option)",
        lambda env: cli("sae", "train", "--lrr", "0.1"),
        ("unrecognized arguments", "--lrr"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train --lr fast (wrong type)",
        lambda env: cli("sae", "train", "--lr", "fast"),
        ("--lr", "fast", "float"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train --warmup-steps -5",
        lambda env: cli("sae", "train", "--warmup-steps", "-5", "--out-dir", str(env.tmp / "o")),
        ("warmup_steps",),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train missing CONFIG file",
        lambda env: cli("sae", "train", str(env.tmp / "nope.toml")),
        ("nope.toml", "does not exist"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train of a model folder that does not exist",
        lambda env: cli("sae", "train", train_toml(env, model=str(env.tmp / "nomodel"))),
        ("nomodel", "does not exist"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "sae train at a hook the model lacks",
        lambda env: cli("sae", "train", train_toml(env, hook_name="blocks.7.hook_resid_post")),
        ("blocks.7", "0..0"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "cooc run with results_dir a file",
        lambda env: cli("cooc", "run", cooc_toml(env, str(a_file(env)))),
        ("results_dir", "is a file"),
        errors=(CliFailed,),
        lost=still_there(lambda env: env.tmp / "taken", "my notes"),
    )
    yield Case("cli", "cooc run without CONFIG", lambda env: cli("cooc", "run"), ("CONFIG",), errors=(CliFailed,))
    yield Case(
        "cli",
        "cooc count --counting.n-batches 0",
        lambda env: cli("cooc", "count", cooc_toml(env, str(env.tmp / "r")), "--counting.n-batches", "0"),
        ("n_batches",),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "cooc graphs before any count",
        lambda env: cli("cooc", "graphs", cooc_toml(env, str(env.tmp / "r"))),
        ("count",),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "cooc colour CONFIG (unknown stage)",
        lambda env: cli("cooc", "colour", "x.toml"),
        ("invalid choice", "colour"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "dashboards without sae in the file",
        lambda env: cli("dashboards", str(toml(env.tmp / "d.toml", f'model = "{env.saved}"\n'))),
        ("sae",),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "dashboards out_dir a file",
        lambda env: cli(
            "dashboards", str(toml(env.tmp / "d.toml", f'sae = "{env.sae_dir}"\nout_dir = "{a_file(env)}"\n'))
        ),
        ("out_dir", "is a file"),
        errors=(CliFailed,),
        lost=still_there(lambda env: env.tmp / "taken", "my notes"),
    )
    yield Case(
        "cli",
        "demo --config a missing file",
        lambda env: cli("demo", "--config", str(env.tmp / "j.toml")),
        ("j.toml", "does not exist"),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "demo --out-dir a file",
        lambda env: cli("demo", "--out-dir", str(a_file(env))),
        ("out_dir", "is a file"),
        errors=(CliFailed,),
        lost=still_there(lambda env: env.tmp / "taken", "my notes"),
    )
    yield Case(
        "cli", "demo --stages lookk", lambda env: cli("demo", "--stages", "lookk"), ("lookk",), errors=(CliFailed,)
    )
    yield Case(
        "cli",
        "export neuronpedia of a folder without dashboards",
        lambda env: cli("export", "neuronpedia", str(env.tmp), "--out", str(env.tmp / "x")),
        ("dashboards",),
        errors=(CliFailed,),
    )
    yield Case(
        "cli",
        "app on a results dir that does not exist",
        lambda env: _app_check(env.tmp / "none"),
        ("none", "not a directory", "results directory"),
    )
    yield Case(
        "cli", "a KeyError reaches the user unquoted", lambda env: _key_error_line(), ("no tool named",), lost=None
    )
    yield Case(
        "cli",
        "every CLI error is one line plus a hint",
        lambda env: _one_line_cli(env),
        ("--debug",),
        errors=(CliFailed,),
    )


def _app_check(path: Path) -> None:
    run_app(str(path), "127.0.0.1", 0)


def _key_error_line() -> None:
    line = error_line(KeyError("no tool named 'x'"))
    if line.startswith(("'", '"')):
        raise CliFailed(1, line + " (quoted)")
    raise ValueError(line)


def _one_line_cli(env: Env) -> None:
    try:
        cli("sae", "train", "--n-tokens", "1", "--out-dir", str(env.tmp / "o"))
    except CliFailed as e:
        lines = str(e).splitlines()
        if len(lines) != 2:
            raise ValueError(f"{len(lines)} lines: {str(e)[:200]}") from None
        raise


def cache_cases() -> Iterator[Case]:
    def corpus_with_cache(make: Callable[[Path], Path]) -> Callable[[Env], Any]:
        def run(env: Env) -> list[str]:
            location = make(env.tmp / "cache")
            old_env, old_build = os.environ.get("MECHSCOPE_CACHE"), corpus._build_default_texts
            os.environ["MECHSCOPE_CACHE"] = str(location)
            corpus._build_default_texts = lambda: iter(["one document", "another"])  # the real one takes seconds
            try:
                texts = list(corpus.default_texts())
            finally:
                corpus._build_default_texts = old_build
                if old_env is None:
                    os.environ.pop("MECHSCOPE_CACHE")
                else:
                    os.environ["MECHSCOPE_CACHE"] = old_env
            if texts != ["one document", "another"]:
                raise Lost("the default corpus came back different")
            return texts

        return run

    yield Case(
        "cache",
        "MECHSCOPE_CACHE is a file",
        corpus_with_cache(lambda p: toml(p, "x")),
        ("MECHSCOPE_CACHE",),
        warns=True,
    )
    yield Case(
        "cache",
        "MECHSCOPE_CACHE under a file",
        corpus_with_cache(lambda p: toml(p, "x") / "sub"),
        ("MECHSCOPE_CACHE",),
        warns=True,
    )
    yield Case(
        "cache",
        "MECHSCOPE_CACHE not writable (/proc)",
        corpus_with_cache(lambda p: Path("/proc/ms-cache")),
        ("MECHSCOPE_CACHE",),
        warns=True,
    )


# ---- the experiment bench: hostile results and arguments ------------------------------------------------------


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")


def experiment_cases() -> Iterator[Case]:
    def bench(env: Env):
        return Experiment(object(), save_dir=env.tmp / "runs")

    def returns(make: Callable[[], Any], *args: Any) -> tuple[Callable[[Env], Any], Callable[[Env], None]]:
        got: dict[str, Any] = {}

        def run(env: Env) -> Any:
            exp = bench(env)
            value = make()
            got["value"] = value

            @exp.log_experiment
            def hostile(*a: Any) -> Any:
                return value

            got["returned"] = hostile(*args)
            got["exp"] = exp
            return got["returned"]

        def lost(env: Env) -> None:
            if "exp" not in got:
                raise Lost("the experiment raised: its return value is gone")
            if got["returned"] is not got["value"]:
                raise Lost("the function's return value was replaced")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not got["exp"].runs("hostile"):
                    raise Lost("the run is not listed")

        return run, lost

    def loop() -> list:
        x: list = [1]
        x.append(x)
        return x

    hostile: list[tuple[str, Callable[[], Any], tuple[Any, ...], tuple[str, ...]]] = [
        ("a sparse tensor", lambda: torch.eye(3).to_sparse(), (), ()),
        ("a sparse CSR tensor", lambda: torch.eye(3).to_sparse_csr(), (), ()),
        ("a meta tensor", lambda: torch.empty(2, device="meta"), (), ("meta",)),
        ("a self-referencing list", loop, (), ("contains itself",)),
        ("an object whose repr raises", BadRepr, (), ("BadRepr",)),
        ("a tensor that requires grad", lambda: torch.ones(2, requires_grad=True), (), ()),
        ("a numpy object array", lambda: np.array([{"a": 1}], dtype=object), (), ("ndarray",)),
        ("a generator", lambda: (i for i in range(3)), (), ("generator",)),
        ("a huge int 2**100", lambda: 2**100, (), ()),
        ("nan and inf floats", lambda: [float("nan"), float("inf")], (), ()),
        ("a dict with tuple keys", lambda: {(1, 2): 3}, (), ()),
        ("a lambda", lambda: lambda x: x, (), ("function",)),
        ("an argument whose repr raises", lambda: 1, (BadRepr(),), ()),
        ("an argument that is a meta tensor", lambda: 1, (torch.empty(2, device="meta"),), ()),
    ]
    for what, make, args, words in hostile:
        run, lost = returns(make, *args)
        yield Case("experiments", f"result: {what}" if not args else what, run, words, accept=True, lost=lost)

    def truncated_record(env: Env) -> list[dict]:
        exp = bench(env)

        @exp.log_experiment
        def f() -> int:
            return 1

        f()
        f()
        first = sorted(exp.save_dir.glob("f/*/run.json"))[0]
        truncate(first)
        records = exp.runs()
        if len(records) != 1:
            raise Lost(f"{len(records)} runs listed, not the 1 intact one")
        return records

    yield Case(
        "experiments", "a truncated run.json among good ones", truncated_record, ("run.json", "skipped"), warns=True
    )

    def save_dir_file(env: Env) -> Any:
        exp = Experiment(object(), save_dir=toml(env.tmp / "runs", "my notes"))

        @exp.log_experiment
        def f() -> int:
            return 1

        return f()

    yield Case(
        "experiments",
        "save_dir is a file",
        save_dir_file,
        ("runs", "file"),
        lost=still_there(lambda env: env.tmp / "runs", "my notes"),
    )

    def raising(env: Env) -> Any:
        exp = bench(env)

        @exp.log_experiment
        def f() -> int:
            raise ZeroDivisionError("the user's own error")

        return f()

    yield Case(
        "experiments",
        "the function raises (its error must come through)",
        raising,
        ("the user's own error",),
        errors=(ZeroDivisionError,),
    )
    yield Case("experiments", "use_tools('nope')", lambda env: bench(env).use_tools("nope"), ("nope", "available"))
    yield Case("experiments", "load_run of an unknown id", lambda env: bench(env).load_run("nope"), ("nope", "runs()"))


# ---- the analysis tools ----------------------------------------------------------------------------------------------


def tool_cases() -> Iterator[Case]:
    def tool(name: str) -> Callable[[Env], Any]:
        return lambda env: tools.get_tool_class(name)(env.llama)

    res, att, lens, svd, surg = (tool(n) for n in ("residual", "attention", "logit_lens", "svd", "surgery"))
    pat, caus, comp, spars, sup = (tool(n) for n in ("patching", "causal", "composition", "sparsity", "superposition"))
    neu = tool("neurons")
    ids = torch.tensor([[1, 2, 3, 4]])
    cases: list[tuple[str, Callable[[Env], Any], tuple[str, ...]]] = [
        (
            "residual_decomposition(layer_idx=5)",
            lambda env: res(env).residual_decomposition(ids, 5),
            ("layer_idx=5", "0..2"),
        ),
        (
            "residual_decomposition(layer_idx=1.0)",
            lambda env: res(env).residual_decomposition(ids, 1.0),
            ("1.0", "0..2"),
        ),
        ("residual_movement(layer 0, layer 9)", lambda env: res(env).residual_movement(ids, 0, 9), ("9", "0..2")),
        ("attention_patterns(layer=9)", lambda env: att(env).attention_patterns(ids, layer=9), ("9", "0..1")),
        ("top_attended_tokens(k=0)", lambda env: att(env).top_attended_tokens(ids, 0, k=0), ("k=0",)),
        ("top_attended_tokens(head=99)", lambda env: att(env).top_attended_tokens(ids, 0, head=99), ("99", "head")),
        ("ablate_heads(heads=(0, 99))", lambda env: att(env).ablate_heads(ids, (0, 99)), ("99", "head")),
        ("ablate_heads(heads=[])", lambda env: att(env).ablate_heads(ids, []), ("no heads",)),
        ("ablate_heads(method='half')", lambda env: att(env).ablate_heads(ids, (0, 0), method="half"), ("half",)),
        ("induction_scores(seq_len=1)", lambda env: att(env).induction_scores(seq_len=1), ("seq_len",)),
        ("logit_lens(k=0)", lambda env: lens(env).logit_lens(ids, k=0), ("k=0",)),
        ("logit_lens(position=10) of 4 tokens", lambda env: lens(env).logit_lens(ids, position=10), ("position", "10")),
        (
            "logit_lens(sites='resid_middle')",
            lambda env: lens(env).logit_lens(ids, sites="resid_middle"),
            ("resid_middle",),
        ),
        ("logit_lens(target_ids=50300)", lambda env: lens(env).logit_lens(ids, target_ids=50300), ("50300",)),
        ("get_singular_vectors('QK')", lambda env: svd(env).get_singular_vectors("QK", 0), ("QK", "OV")),
        ("get_singular_vectors(OV, no head)", lambda env: svd(env).get_singular_vectors("OV", 0), ("head_index",)),
        (
            "get_singular_vectors(num_vectors=10**6)",
            lambda env: svd(env).get_singular_vectors("w_out", 0, num_vectors=10**6),
            ("num_vectors",),
        ),
        ("get_singular_vectors(layer 9)", lambda env: svd(env).get_singular_vectors("w_out", 9), ("9", "0..1")),
        ("surgery.delete(9)", lambda env: _enter(surg(env).delete(9)), ("9",)),
        ("surgery.permute([0, 0])", lambda env: _enter(surg(env).permute([0, 0])), ("permut",)),
        (
            "patch_layers(site='bogus')",
            lambda env: pat(env).patch_layers(ids, ids, _metric, site="bogus"),
            ("bogus", "resid_pre"),
        ),
        (
            "patch_layers of different lengths",
            lambda env: pat(env).patch_layers(ids, ids[:, :3], _metric),
            ("same shape", "pad or trim"),
        ),
        ("patch_point(over='time')", lambda env: pat(env).patch_point(ids, ids, _metric, HOOK, over="time"), ("time",)),
        (
            "patch_point at an unknown hook",
            lambda env: pat(env).patch_point(ids, ids, _metric, "blocks.0.nope"),
            ("blocks.0.nope",),
        ),
        (
            "a metric returning a vector",
            lambda env: pat(env).patch_layers(ids, ids, lambda lg: lg[:, -1, :3]),
            ("metric", "scalar"),
        ),
        ("causal trace, subject not in the prompt", lambda env: caus(env).trace("abcd", 5, "zz"), ("zz",)),
        ("causal trace(kind='head')", lambda env: caus(env).trace("abcd", 5, "b", kind="head"), ("head", "resid")),
        ("causal trace(target=-1)", lambda env: caus(env).trace("abcd", -1, "b"), ("-1",)),
        ("composition_scores('X')", lambda env: comp(env).composition_scores("X"), ("'X'", "Q")),
        ("activation_sparsity(hook_names='nope')", lambda env: spars(env).activation_sparsity(ids, "nope"), ("nope",)),
        ("activation_sparsity(eps=-1)", lambda env: spars(env).activation_sparsity(ids, eps=-1), ("eps",)),
        ("activation_sparsity([]) (no batches)", lambda env: spars(env).activation_sparsity([]), ("empty",)),
        (
            "disentangle_superposition(n_concepts=1000)",
            lambda env: sup(env).disentangle_superposition(torch.eye(8), n_concepts=1000),
            ("n_concepts",),
        ),
        (
            "disentangle_superposition(method='svd')",
            lambda env: sup(env).disentangle_superposition(torch.randn(20, 8), method="svd"),
            ("svd", "pca"),
        ),
        ("collect_activations(layer='nope')", lambda env: sup(env).collect_activations(ids, "nope"), ("nope",)),
        (
            "top_activating(neuron=10**6)",
            lambda env: neu(env).top_activating("blocks.0.mlp.hook_post", 10**6, corpus=ids),
            ("1000000",),
        ),
        (
            "top_activating(k=0)",
            lambda env: neu(env).top_activating("blocks.0.mlp.hook_post", 0, k=0, corpus=ids),
            ("k",),
        ),
        ("get_tool_class('nope')", lambda env: tools.get_tool_class("nope"), ("nope", "registered tools")),
        ("register_tool('bad name')", lambda env: tools.register_tool("bad name", object), ("identifier",)),
        ("register_tool over an existing name", lambda env: tools.register_tool("svd", object), ("overwrite",)),
    ]
    for what, run, words in cases:
        yield Case("tools", what, run, words)


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 0].mean()


def _enter(manager: Any) -> None:
    with manager:
        pass


# ---- the pipelines: SAE and model that do not fit ----------------------------------------------------------------


def pipeline_cases() -> Iterator[Case]:
    def other_hook_sae() -> SparseAutoencoder:
        return SparseAutoencoder(
            SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name="blocks.0.hook_resid_pre")
        )

    yield Case(
        "pipelines",
        "count an SAE at a hook it was not trained on",
        lambda env: pipeline.run_count(env.cooc_config(env.tmp / "r"), model=env.small, sae={HOOK: other_hook_sae()}),
        ("blocks.0.hook_resid_pre", HOOK, "allow_hook_mismatch"),
    )
    yield Case(
        "pipelines",
        "count an SAE of another width",
        lambda env: pipeline.run_count(
            env.cooc_config(env.tmp / "r"),
            model=env.small,
            sae={HOOK: SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, hook_name=HOOK))},
        ),
        ("d_in", "8", "16"),
    )
    yield Case(
        "pipelines",
        "count at a hook the model lacks",
        lambda env: pipeline.run_count(
            env.cooc_config(
                env.tmp / "r",
                hook_names=["blocks.5.hook_resid_post"],
                sae={"blocks.5.hook_resid_post": str(env.sae_dir)},
            ),
            model=env.small,
        ),
        ("blocks.5",),
    )
    yield Case(
        "pipelines",
        "count with a corpus file that does not exist",
        lambda env: pipeline.run_count(
            env.cooc_config(env.tmp / "r", corpus=str(env.tmp / "none.txt")), model=env.small, sae={HOOK: env.sae}
        ),
        ("none.txt", "not a file"),
    )
    yield Case(
        "pipelines",
        "count with an empty corpus file",
        lambda env: pipeline.run_count(
            env.cooc_config(env.tmp / "r", corpus=str(toml(env.tmp / "e.txt", ""))),
            model=env.small,
            sae={HOOK: env.sae},
        ),
        ("e.txt", "no tokens"),
    )
    yield Case(
        "pipelines",
        "count with a .jsonl corpus without the text field",
        lambda env: pipeline.run_count(
            env.cooc_config(env.tmp / "r", corpus=str(toml(env.tmp / "c.jsonl", '{"body": "x"}\n'))),
            model=env.small,
            sae={HOOK: env.sae},
        ),
        ("text",),
    )
    yield Case(
        "pipelines",
        "count a rerun under other settings",
        lambda env: _recount_other(env),
        ("batch_size_tokens", "results_dir"),
    )
    yield Case(
        "pipelines", "train_sae where the store lacks the hook", lambda env: _train_other_hook(env), (HOOK, "hook_name")
    )
    yield Case(
        "pipelines",
        "train_sae with batch_size_tokens above the data",
        lambda env: _train_no_batch(env),
        ("batch_size_tokens",),
    )
    yield Case("pipelines", "train_sae on a model at hook 'blocks.x.resid'", _train_bad_hook, ("blocks.x.resid",))
    yield Case("pipelines", "train_sae with k above d_sae (derived)", lambda env: _train_big_k(env), ("k", "d_sae"))


def _train_bad_hook(env: Env) -> Any:
    # a TrainConfig's hook_name is any key of its batch source; with a model it must be one of the model's points
    return train_sae(env.train_config(env.tmp / "o", hook_name="blocks.x.resid"), model=env.small)


def _recount_other(env: Env) -> Any:
    out = Path(shutil.copytree(env.count_run, env.tmp / "count"))
    return pipeline.run_count(env.cooc_config(out, batch_size_tokens=16), model=env.small, sae={HOOK: env.sae})


def _train_other_hook(env: Env) -> Any:
    class Other(Rows):
        def batches(self, *a: Any, **k: Any):
            for b in super().batches(*a, **k):
                yield {"blocks.1.hook_resid_post": b[HOOK]}

    return train_sae(env.train_config(env.tmp / "o"), store=Other(16))


def _train_no_batch(env: Env) -> Any:
    class Few(Rows):
        def batches(self, batch_size: int, *a: Any, **k: Any):
            yield {HOOK: torch.randn(batch_size - 1, self.d)}

    return train_sae(env.train_config(env.tmp / "o"), store=Few(16))


def _train_big_k(env: Env) -> Any:
    return train_sae(env.train_config(env.tmp / "o", d_sae=None, expansion_factor=1, k=20), store=Rows(16))


# ---- more entry points: the model's structure, the cache, files, SAE writing, more tools ---------------------------


def more_model_cases() -> Iterator[Case]:
    ids = torch.tensor([[1, 2, 3]])
    yield Case(
        "tokens",
        "forward(meta tensor ids)",
        lambda env: env.llama(torch.ones(1, 2, dtype=torch.long, device="meta")),
        ("meta", "device"),
    )
    yield Case("tokens", "forward(list of str with None)", lambda env: env.llama(["ab", None]), ACCEPTED)
    yield Case("tokens", "forward(tuple of ids)", lambda env: env.llama((1, 2, 3)), (), accept=True)
    yield Case(
        "tokens",
        "forward(int64 numpy 2-D, 513 long)",
        lambda env: env.llama(np.zeros((1, 513), np.int64)),
        ("n_ctx = 512",),
    )
    yield Case(
        "hooks",
        "hook_width('blocks.0.hook_nope')",
        lambda env: env.llama.hook_width("blocks.0.hook_nope"),
        ("blocks.0.hook_nope",),
    )
    yield Case(
        "hooks",
        "stop_layer_for(['blocks.9.hook_resid_post'])",
        lambda env: env.llama.stop_layer_for(["blocks.9.hook_resid_post"]),
        ("blocks.9", "0..1"),
    )
    yield Case(
        "hooks",
        "module_hook(a module outside the model)",
        lambda env: env.llama.module_hook(torch.nn.Linear(2, 2)),
        ("not a submodule",),
    )
    yield Case(
        "hooks",
        "module_hook(which='middle')",
        lambda env: env.llama.module_hook(env.llama.ln_final, "middle"),
        ("which", "'pre'", "'post'"),
    )
    yield Case(
        "hooks",
        "add_hook('blocks.0.hook_nope')",
        lambda env: env.llama.add_hook("blocks.0.hook_nope", lambda t, hook: None),
        ("blocks.0.hook_nope",),
    )
    yield Case(
        "hooks",
        "fwd_hooks given one bare pair, not a list",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=(HOOK, lambda t, hook: None)),
        ("[(name, hook)]",),
    )
    yield Case(
        "hooks",
        "a hook with the wrong signature fn(t)",
        lambda env: env.llama.run_with_hooks("hi", fwd_hooks=[(HOOK, _one_argument)]),
        ("_one_argument", "hook"),
        lost=_no_hooks_left,
    )
    yield Case(
        "hooks",
        "use_attn_in on a grouped-query model",
        lambda env: _gqa().set_use_attn_in(True),
        ("grouped-query", "use_split_qkv_input"),
    )
    yield Case(
        "hooks",
        "attention pattern hook returns another shape",
        lambda env: env.llama.run_with_hooks(
            "hi", fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t[..., :1])]
        ),
        ("hook_pattern", "shape"),
    )
    yield Case(
        "cache",
        "cache['blocks.0.hook_nope']",
        lambda env: env.llama.run_with_cache(ids, names_filter=HOOK)[1]["blocks.0.hook_nope"],
        ("blocks.0.hook_nope",),
    )
    yield Case(
        "cache",
        "cache['resid_post', 9] (2 layers)",
        lambda env: env.llama.run_with_cache(ids, names_filter=HOOK)[1]["resid_post", 9],
        ("9",),
    )
    yield Case(
        "cache",
        "cache of a point not kept",
        lambda env: env.llama.run_with_cache(ids, names_filter=HOOK)[1]["blocks.1.hook_resid_post"],
        ("names_filter",),
    )
    yield Case(
        "cache",
        "cache.accumulated_resid with names missing",
        lambda env: env.llama.run_with_cache(ids, names_filter=HOOK)[1].accumulated_resid(),
        ("names_filter",),
    )
    yield Case(
        "generate",
        "generate(fwd_hooks=[bad name])",
        lambda env: env.llama.generate(
            "hi", max_new_tokens=1, fwd_hooks=[("blocks.0.hook_nope", lambda t, hook: None)]
        ),
        ("blocks.0.hook_nope",),
    )
    yield Case(
        "generate",
        "generate(stop_at_eos='no')",
        lambda env: env.llama.generate("hi", max_new_tokens=1, stop_at_eos="no"),
        ("stop_at_eos", "True or False"),
    )
    yield Case(
        "generate",
        "generate(top_k='5')",
        lambda env: env.llama.generate("hi", max_new_tokens=1, top_k="5"),
        ("top_k", "int"),
    )
    yield Case(
        "generate",
        "generate(top_p='0.5')",
        lambda env: env.llama.generate("hi", max_new_tokens=1, top_p="0.5"),
        ("top_p", "(0, 1]"),
    )
    yield Case(
        "generate",
        "generate(temperature=True)",
        lambda env: env.llama.generate("hi", max_new_tokens=1, temperature=True),
        ("temperature", "number"),
    )
    yield Case(
        "forward",
        "run_with_cache(names_filter=HOOK, stop_at_layer=1.5)",
        lambda env: env.llama.run_with_cache(ids, names_filter=HOOK, stop_at_layer=1.5),
        ("stop_at_layer",),
    )
    yield Case(
        "forward",
        "step() with a kv_cache that is not one",
        lambda env: env.llama.step(ids, kv_cache={}),
        ("kv_cache", "new_kv_cache"),
    )


def _one_argument(t: torch.Tensor) -> None:
    return None


def _gqa() -> Any:
    return HookedModel(
        HookedAutoConfig(
            "llama",
            num_hidden_layers=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
        )
    )


def more_file_cases() -> Iterator[Case]:
    yield Case(
        "damaged files",
        "files.read_json of a missing file",
        lambda env: files.read_json(env.tmp / "no.json"),
        ("no.json",),
        errors=(FileNotFoundError,),
    )
    yield Case(
        "damaged files",
        "atomic_write_text under a file",
        lambda env: files.atomic_write_text(toml(env.tmp / "taken", "my notes") / "x.txt", "y"),
        ("taken",),
        lost=still_there(lambda env: env.tmp / "taken", "my notes"),
    )
    yield Case(
        "damaged files",
        "atomic_write whose writer fails keeps the old file",
        lambda env: files.atomic_write(toml(env.tmp / "keep.txt", "old"), _failing_writer),
        ("half-way",),
        errors=(RuntimeError,),
        lost=_kept_and_no_temp,
    )
    yield Case(
        "damaged files",
        "check_settings against other settings",
        lambda env: files.check_settings(
            {"a": 1}, {"a": 2}, where=env.tmp, what="was written", fix="use another folder"
        ),
        ("a", "another folder"),
    )
    yield Case(
        "sae files",
        "save_sae to a path that is a file",
        lambda env: save_sae(env.sae, toml(env.tmp / "taken", "my notes")),
        ("taken",),
        lost=still_there(lambda env: env.tmp / "taken", "my notes"),
    )
    yield Case(
        "sae files",
        "save_sae(overwrite='yes')",
        lambda env: save_sae(env.sae, env.tmp / "s", overwrite="yes"),
        ("overwrite", "True or False"),
    )
    yield Case(
        "sae files",
        "a sparsify folder with a truncated sae.safetensors",
        lambda env: load_sae(_sparsify(env, damage=True)),
        ("sae.safetensors",),
    )
    yield Case(
        "sae files", "a torch file that is not a state dict", lambda env: load_sae(_torch_list(env)), ("state dict",)
    )
    yield Case(
        "sae files",
        "a pickled (non-weights-only) torch file",
        lambda env: load_sae(_torch_pickle(env)),
        ("weights",),
        lost=_no_pickle_run,
    )


class _Payload:
    ran: typing.ClassVar[bool] = False

    def __reduce__(self) -> tuple:
        return (_Payload._mark, ())

    @staticmethod
    def _mark() -> None:
        _Payload.ran = True


def _torch_pickle(env: Env) -> Path:
    path = env.tmp / "sae.pt"
    torch.save({"W_enc": torch.zeros(2, 2), "x": _Payload()}, path)
    _Payload.ran = False
    return path


def _no_pickle_run(env: Env) -> None:
    if _Payload.ran:
        raise Lost("loading ran code from the pickle")


def _torch_list(env: Env) -> Path:
    path = env.tmp / "list.pt"
    torch.save([torch.zeros(2)], path)
    return path


def _sparsify(env: Env, damage: bool) -> Path:
    folder = env.tmp / "sparsify"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 16, "num_latents": 32, "k": 4}))
    save_file(
        {
            "encoder.weight": torch.zeros(32, 16),
            "encoder.bias": torch.zeros(32),
            "W_dec": torch.zeros(32, 16),
            "b_dec": torch.zeros(16),
        },
        folder / "sae.safetensors",
    )
    if damage:
        truncate(folder / "sae.safetensors")
    return folder


def _failing_writer(tmp: Path) -> None:
    tmp.write_text("new, half")
    raise RuntimeError("the writer failed half-way")


def _kept_and_no_temp(env: Env) -> None:
    if (env.tmp / "keep.txt").read_text() != "old":
        raise Lost("the old file was replaced by a half-written one")
    if any(p.name != "keep.txt" for p in env.tmp.iterdir()):
        raise Lost("a temporary file was left behind")


def more_tool_cases() -> Iterator[Case]:
    def tool(name: str) -> Callable[[Env], Any]:
        return lambda env: tools.get_tool_class(name)(env.llama)

    res, att, surg, neu, sup, svd, comp = (
        tool(n) for n in ("residual", "attention", "surgery", "neurons", "superposition", "svd", "composition")
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    cases: list[tuple[str, Callable[[Env], Any], tuple[str, ...]]] = [
        (
            "feature_attribution(target_ids=50300)",
            lambda env: res(env).feature_attribution(ids, 50300),
            ("target_ids", "0..50256"),
        ),
        (
            "feature_attribution(position=9) of 4 tokens",
            lambda env: res(env).feature_attribution(ids, 5, position=9),
            ("position", "9"),
        ),
        ("feature_attribution(n_steps=0)", lambda env: res(env).feature_attribution(ids, 5, n_steps=0), ("n_steps",)),
        (
            "top_attended_tokens(query_pos=9) of 4 tokens",
            lambda env: att(env).top_attended_tokens(ids, 0, query_pos=9),
            ("query_pos", "9"),
        ),
        ("attention_patterns(layer=-1)", lambda env: att(env).attention_patterns(ids, layer=-1), ("-1", "0..1")),
        ("surgery.replace({0: 'not a module'})", lambda env: _enter(surg(env).replace({0: "x"})), ("Module",)),
        ("surgery.rearranged([])", lambda env: _enter(surg(env).rearranged([])), ("empty",)),
        ("surgery.delete(0, 1) (every block)", lambda env: _enter(surg(env).delete(0, 1)), ("empty",)),
        (
            "top_activating without neuron or direction",
            lambda env: neu(env).top_activating("blocks.0.mlp.hook_post", corpus=ids),
            ("exactly one",),
        ),
        (
            "top_activating(direction of the wrong width)",
            lambda env: neu(env).top_activating("blocks.0.mlp.hook_post", direction=torch.ones(3), corpus=ids),
            ("3", "width"),
        ),
        (
            "top_activating(corpus a missing file)",
            lambda env: neu(env).top_activating("blocks.0.mlp.hook_post", 0, corpus=str(env.tmp / "none.txt")),
            ("none.txt",),
        ),
        (
            "ablation_effect(mode='half')",
            lambda env: neu(env).ablation_effect("blocks.0.mlp.hook_post", 0, mode="half", corpus=ids),
            ("half",),
        ),
        (
            "interpolate_concepts of different shapes",
            lambda env: sup(env).interpolate_concepts(torch.ones(3), torch.ones(4), 0.5),
            ("shape",),
        ),
        (
            "project_activations of another width",
            lambda env: sup(env).project_activations(torch.ones(5, 3), torch.ones(4, 2)),
            ("3", "4"),
        ),
        (
            "get_singular_vectors(w_in, head_index=0)",
            lambda env: svd(env).get_singular_vectors("w_in", 0, head_index=0),
            ("head_index",),
        ),
        (
            "get_singular_vectors(OV, head_index=99)",
            lambda env: svd(env).get_singular_vectors("OV", 0, head_index=99),
            ("99", "head"),
        ),
        (
            "composition_scores(fold_ln='yes')",
            lambda env: comp(env).composition_scores("Q", fold_ln="yes"),
            ("fold_ln", "True or False"),
        ),
        ("register_tool('x', 3) (not a class)", lambda env: tools.register_tool("x_tool_sweep", 3), ("class",)),
    ]
    for what, run, words in cases:
        yield Case("tools", what, run, words)
    yield Case(
        "tools",
        "ablate_heads(method='mean') without reference_ids (documented: the input's own mean)",
        lambda env: att(env).ablate_heads(ids, (0, 0), method="mean"),
        accept=True,
    )
    yield Case(
        "tools",
        "get_tool_class of an unimportable path",
        lambda env: _unimportable_tool(),
        ("no.such.module", "register"),
        errors=(ImportError,),
    )

    def bench(env: Env) -> Experiment:
        return Experiment(object(), save_dir=env.tmp / "runs")

    def missing_param(env: Env) -> Any:
        return bench(env).use_tools("svd")(lambda x: x)

    yield Case(
        "experiments",
        "use_tools('svd') on a function without an svd parameter",
        missing_param,
        ("no parameter named svd",),
    )

    def load_failed(env: Env) -> Any:
        exp = bench(env)

        @exp.log_experiment
        def f() -> int:
            raise ZeroDivisionError("x")

        with contextlib.suppress(ZeroDivisionError):
            f()
        return exp.load_run(exp.runs("f")[0]["run_id"])

    yield Case(
        "experiments", "load_run of a run that raised", load_failed, ("raised", "no result"), errors=(RuntimeError,)
    )

    def damaged_result(env: Env) -> Any:
        exp = bench(env)

        @exp.log_experiment
        def f() -> torch.Tensor:
            return torch.ones(3)

        f()
        run_id = exp.runs("f")[0]["run_id"]
        truncate(next(exp.save_dir.glob(f"f/{run_id}/result.safetensors")))
        return exp.load_run(run_id)

    yield Case(
        "experiments",
        "load_run with a truncated result.safetensors",
        damaged_result,
        ("result.safetensors", "delete the run"),
    )


def _unimportable_tool() -> Any:
    tools.register_tool("sweep_unimportable", "no.such.module.Tool", overwrite=True)
    try:
        return tools.get_tool_class("sweep_unimportable")
    finally:
        tools._REGISTRY.pop("sweep_unimportable", None)


# ---- the list, the table, the page ---------------------------------------------------------------------------------

KINDS: dict[str, Callable[[], Iterator[Case]]] = {
    "tokens": token_cases,
    "forward": forward_cases,
    "hooks": hook_cases,
    "generate": generate_cases,
    "model config": model_config_cases,
    "loading": loading_cases,
    "sae files": sae_cases,
    "config fields": config_cases,
    "settings": settings_cases,
    "damaged files": damaged_cases,
    "cli": cli_cases,
    "cache": cache_cases,
    "experiments": experiment_cases,
    "tools": tool_cases,
    "pipelines": pipeline_cases,
    "more model": more_model_cases,
    "more files": more_file_cases,
    "more tools": more_tool_cases,
}


# The cases not clear yet, by (kind, input), with the file whose fix they wait for.
OPEN: dict[tuple[str, str], str] = {}  # none open: every case is clear


def all_cases(kinds: list[str] | None = None) -> list[Case]:
    """Every case of the kinds ``kinds`` (default all), with its :data:`OPEN` mark."""
    return [
        dataclasses.replace(case, open=OPEN.get((case.kind, case.input), ""))
        for kind, make in KINDS.items()
        if kinds is None or kind in kinds
        for case in make()
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def page(outcomes: list[Outcome]) -> str:
    tally = Counter(o.cls for o in outcomes)
    by_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.case.kind, Counter())[o.cls] += 1
    lines = [
        "# Hardening sweep: every bad input and what it gives",
        "",
        "Generated by `tests/hardening/sweep.py` (issue 13); do not edit by hand. Re-run it from the repository root:",
        "",
        "```bash",
        "PYTHONPATH=$PWD .venv/bin/python -m tests.hardening.sweep --write   # rewrites this page",
        "PYTHONPATH=$PWD .venv/bin/python -m pytest tests/hardening/test_sweep.py -q   # fails on any case not clear",
        "```",
        "",
        "Each case is one bad input on tiny random models (or a hostile result), with the error types and the words a",
        "good message must contain. **clear**: an expected error naming the problem and the fix (or the right warning,",
        "or the input kept whole where keeping it is right); **unclear**: an error, but a raw or misleading one;",
        "**silent**: accepted and misread; **lost**: a result or the user's data gone.",
        "",
        f"{len(outcomes)} cases (about a minute): " + ", ".join(f"**{tally[c]} {c}**" for c in CLASSES) + ".",
        "",
        "| kind | cases | " + " | ".join(CLASSES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CLASSES) + " |",
    ]
    for kind, tally_k in by_kind.items():
        lines.append(f"| {kind} | {sum(tally_k.values())} | " + " | ".join(str(tally_k[c]) for c in CLASSES) + " |")
    lines += [
        "",
        "A case that is not clear names the file whose fix it waits for (`OPEN` in the sweep; the test checks both",
        "ways: a case without a mark must be clear, a marked one must not be, so the list stays true).",
        "",
        "| # | kind | input | what it gives now | class | open in |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, o in enumerate(outcomes, 1):
        lines.append(f"| {i} | {o.case.kind} | {_cell(o.case.input)} | {_cell(o.got)} | {o.cls} | {o.case.open} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/hardening.md")
    parser.add_argument("--only", help="comma-separated kinds: " + ", ".join(KINDS))
    parser.add_argument("--not-clear", action="store_true", help="print only the cases that are not clear")
    args = parser.parse_args(argv)
    kinds = args.only.split(",") if args.only else None
    start = time.perf_counter()
    outcomes = run_cases(all_cases(kinds))
    seconds = time.perf_counter() - start
    for o in outcomes:
        if not args.not_clear or o.cls != "clear":
            print(f"{o.cls:8} {o.case.kind:14} {o.case.input[:60]:60} {o.got[:150]}")
    tally = Counter(o.cls for o in outcomes)
    print(f"{len(outcomes)} cases in {seconds:.1f} s: " + ", ".join(f"{tally[c]} {c}" for c in CLASSES))
    if args.write:
        if kinds is not None:
            parser.error("--write needs the whole sweep (no --only)")
        DOC.write_text(page(outcomes))
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
