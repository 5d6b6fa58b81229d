"""Hook overhead against the peers a user would pick instead: nnsight and TransformerLens's ``HookedTransformer``.

Two benchmarks on randomly initialised GPT-2s, every contender on the same weights:

- ``hook_peers`` (:func:`setup`): the GPT-2-small shape of ``cache_overhead.py``; mechscope's ``run_with_cache``
  keeping ``hook_resid_post`` of the 12 layers, nnsight's ``model.trace`` saving the same tensors (each GPT2Block's
  output), and ``HookedTransformer.run_with_cache`` with the same ``names_filter``, next to plain transformers.
- ``hook_fixed_cost`` (:func:`setup_fixed_cost`): a tiny GPT-2, where what is left is each tool's fixed cost per
  call: an empty trace / ``run_with_cache`` / ``hooks()`` block, and the same with every layer's output saved.

nnsight runs in this process (it installs next to mechscope's torch and transformers). TransformerLens 3.x, the last
release with ``HookedTransformer``, lives in the SAELens venv (``.venv-saelens``, made by ``bash run.sh bench``); it
runs as a persistent worker (``tl_side.py``) that converts the same weights from a ``save_pretrained`` folder and
times each call itself, so the pipe's round trip is not counted and the rounds still alternate all contenders.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from cache_overhead import ATOL, BATCH, GPT2_SMALL, SEQ
from harness import Benchmark, Elapsed, Ratio
from nnsight import NNsight
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from mechscope import ActivationCache, HookedAutoConfig, HookedModel
from mechscope.models.names import block_hook

TINY = {"n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "n_positions": 64}
TINY_SEQ = 16
SAELENS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-saelens" / "bin" / "python"
TL_SIDE = Path(__file__).resolve().parent / "tl_side.py"


def gpt2(shape: dict[str, int], seed: int = 0) -> PreTrainedModel:
    """A randomly initialised GPT-2 of ``shape`` (transformers config fields), float32, eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(HookedAutoConfig("gpt2", **shape)).eval()


def save_gpt2(hf: PreTrainedModel, folder: Path) -> None:
    """``save_pretrained`` with ``n_ctx``, which TransformerLens's GPT-2 config conversion reads and random configs
    lack (as the reference tests save theirs)."""
    hf.config.n_ctx = hf.config.n_positions
    hf.save_pretrained(folder)


def tl_spec(workdir: Path, hf: PreTrainedModel, tokens: torch.Tensor, names: list[str]) -> Path:
    """Write what ``tl_side.py`` reads into ``workdir``: the model folder, the tokens and the spec; the spec's path."""
    if not SAELENS_PYTHON.exists():
        raise FileNotFoundError(f"{SAELENS_PYTHON} is missing: `bash run.sh bench` creates the SAELens venv")
    save_gpt2(hf, workdir / "gpt2")
    save_file({"tokens": tokens}, str(workdir / "tokens.safetensors"))
    spec = {
        "folder": str(workdir / "gpt2"),
        "tokens": str(workdir / "tokens.safetensors"),
        "names": names,
        "answer": str(workdir / "answer.safetensors"),
        "threads": torch.get_num_threads(),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    return workdir / "spec.json"


def tl_command(mode: str, spec: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a ``tl_side.py`` run (the SAELens venv must not see this checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    return [str(SAELENS_PYTHON), str(TL_SIDE), mode, str(spec)], env


class TransformerLensWorker:
    """A running ``tl_side.py serve``: :meth:`unit` gives a contender that runs one call there and returns its time.

    ``answer`` holds the logits and cached tensors of its first ``run_with_cache``, ``version`` TransformerLens's.
    """

    def __init__(self, hf: PreTrainedModel, tokens: torch.Tensor, names: list[str]):
        with tempfile.TemporaryDirectory(prefix="mechscope-bench-tl-") as tmp:  # read before the first answer
            command, env = tl_command("serve", tl_spec(Path(tmp), hf, tokens, names))
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env
            )
            assert self.process.stdin is not None and self.process.stdout is not None
            self.stdin, self.stdout = self.process.stdin, self.process.stdout
            first = self.stdout.readline()
            if not first:
                raise RuntimeError(f"the TransformerLens worker exited with {self.process.wait()} before answering")
            self.version: str = json.loads(first)["version"]
            self.answer = load_file(str(Path(tmp) / "answer.safetensors"))

    def unit(self, name: str) -> Callable[[], Elapsed]:
        def call() -> Elapsed:
            self.stdin.write(name + "\n")
            self.stdin.flush()
            answer = self.stdout.readline().split()
            if not answer or answer[0] != "done":
                raise RuntimeError(f"the TransformerLens worker stopped (exit code {self.process.poll()})")
            return Elapsed(float(answer[1]))

        return call


def nnsight_trace(model: NNsight, tokens: torch.Tensor, layers: int) -> Callable[[], list[torch.Tensor]]:
    """A call of ``model.trace`` on ``tokens`` saving the output of the first ``layers`` GPT2Blocks (none: an empty
    trace); it returns the saved tensors."""
    blocks = model.transformer.h

    def trace() -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []  # bound before the trace: nnsight hands back what its body appends
        with model.trace(input_ids=tokens, use_cache=False):
            for layer in range(layers):
                saved.append(blocks[layer].output.save())
        return saved

    return trace


class Sides:
    """Every contender's model on copies of one ``hf`` (wrapping changes a model in place), with ``tokens`` and the
    hook names of every layer's ``hook_resid_post``."""

    def __init__(self, hf: PreTrainedModel, tokens: torch.Tensor):
        self.hf, self.tokens = hf, tokens
        self.layers = hf.config.n_layer
        self.names = [block_hook(layer, "hook_resid_post") for layer in range(self.layers)]
        self.ms = HookedModel(copy.deepcopy(hf))
        self.nn = NNsight(copy.deepcopy(hf))
        self.tl = TransformerLensWorker(hf, tokens, self.names)

    def transformers(self) -> torch.Tensor:
        return self.hf(input_ids=self.tokens, use_cache=False).logits

    def mechscope_cache(self) -> tuple[torch.Tensor, ActivationCache]:
        return self.ms.run_with_cache(self.tokens, names_filter=self.names)

    def mechscope_empty(self) -> torch.Tensor:
        with self.ms.hooks():
            return self.ms(self.tokens)

    def sanity_check(self) -> str:
        """Check that the logits and the 12 (or 4) cached residuals agree within ``ATOL`` on every side."""
        with torch.inference_mode():
            reference = self.transformers()
            logits, ms_cache = self.mechscope_cache()
            nn_saved = nnsight_trace(self.nn, self.tokens, self.layers)()
        tl = self.tl.answer
        gaps = {
            "logits, mechscope": (logits - reference).abs().max().item(),
            "logits, HookedTransformer": (tl["logits"] - reference).abs().max().item(),
            "residuals, nnsight": max((nn_saved[i] - ms_cache[n]).abs().max().item() for i, n in enumerate(self.names)),
            "residuals, HookedTransformer": max((tl[n] - ms_cache[n]).abs().max().item() for n in self.names),
        }
        if max(gaps.values()) > ATOL:
            raise AssertionError(f"contenders disagree by more than {ATOL}: {gaps}")
        return (
            f"Sanity check (max |Δ|, must be ≤ {ATOL:g}): logits vs transformers — mechscope "
            f"{gaps['logits, mechscope']:.1e}, HookedTransformer {gaps['logits, HookedTransformer']:.1e}; the "
            f"{self.layers} residuals vs mechscope's `hook_resid_post` — nnsight {gaps['residuals, nnsight']:.1e}, "
            f"HookedTransformer {gaps['residuals, HookedTransformer']:.1e}."
        )

    def common_notes(self) -> list[str]:
        return [
            "transformers is the unwrapped model called with `use_cache=False`, as mechscope and nnsight call it.",
            f"nnsight {version('nnsight')}: `NNsight(model)` on a copy of the same transformers model; "
            "`with model.trace(input_ids=..., use_cache=False)` appending `model.transformer.h[i].output.save()` "
            "(the GPT2Block's output, which is `hook_resid_post`) to a list.",
            f"HookedTransformer: TransformerLens {self.tl.version} (`.venv-saelens`), built by its own config and "
            "weight conversion of the same weights saved with `save_pretrained`, without weight processing; a "
            "persistent worker process times each call itself (the pipe's round trip is not counted).",
            "Every call runs under `torch.inference_mode()`. Each round calls the contenders in a fresh random "
            "order: in a fixed rotation the call after the worker's would always find the caches cold.",
        ]


def setup() -> Benchmark:
    """GPT-2-small shape: the four sides caching every layer's ``hook_resid_post``, checked to agree first."""
    sides = Sides(gpt2(GPT2_SMALL), torch.randint(0, GPT2_SMALL["vocab_size"], (BATCH, SEQ)))
    contenders: dict[str, Callable[[], object]] = {
        "transformers": torch.inference_mode()(sides.transformers),
        "mechscope cache": torch.inference_mode()(sides.mechscope_cache),
        "nnsight trace": torch.inference_mode()(nnsight_trace(sides.nn, sides.tokens, sides.layers)),
        "HookedTransformer": sides.tl.unit("forward"),
        "HookedTransformer cache": sides.tl.unit("cache"),
    }
    return Benchmark(
        description=(
            f"Wall time of one forward pass over a batch of {BATCH}×{SEQ} random tokens through the randomly "
            "initialised GPT-2-small-shaped model of cache_overhead (12 layers, d_model 768, 12 heads, vocab 50257, "
            "float32) keeping the residual stream after each of the 12 blocks: mechscope `run_with_cache` with "
            "`names_filter` the 12 `hook_resid_post`, nnsight `model.trace` saving each block's output, "
            "TransformerLens `HookedTransformer.run_with_cache` with the same `names_filter`; plain transformers and "
            "HookedTransformer's own unhooked forward for reference."
        ),
        contenders=contenders,
        ratios=[
            Ratio("mechscope cache", "transformers", target=1.02),
            Ratio("nnsight trace", "transformers"),
            Ratio("HookedTransformer cache", "transformers"),
            Ratio("HookedTransformer", "transformers"),
            Ratio("mechscope cache", "nnsight trace", target=1.0),
            Ratio("mechscope cache", "HookedTransformer cache", target=1.0),
        ],
        notes=[*sides.common_notes(), sides.sanity_check()],
        repeats=60,
        shuffle=True,
    )


def setup_fixed_cost() -> Benchmark:
    """A tiny GPT-2: each tool's fixed cost per call, empty and with every layer's output saved."""
    sides = Sides(gpt2(TINY), torch.randint(0, TINY["vocab_size"], (1, TINY_SEQ)))
    saves = sides.layers
    contenders: dict[str, Callable[[], object]] = {
        "transformers": torch.inference_mode()(sides.transformers),
        "mechscope hooks()": torch.inference_mode()(sides.mechscope_empty),
        f"mechscope cache ×{saves}": torch.inference_mode()(sides.mechscope_cache),
        "nnsight empty trace": torch.inference_mode()(nnsight_trace(sides.nn, sides.tokens, 0)),
        f"nnsight trace ×{saves}": torch.inference_mode()(nnsight_trace(sides.nn, sides.tokens, saves)),
        "HookedTransformer empty cache": sides.tl.unit("empty"),
        f"HookedTransformer cache ×{saves}": sides.tl.unit("cache"),
    }
    return Benchmark(
        description=(
            f"The fixed cost of a hooked call: a tiny random GPT-2 ({TINY['n_layer']} layers, d_model "
            f"{TINY['n_embd']}, {TINY['n_head']} heads, vocab {TINY['vocab_size']}) on 1×{TINY_SEQ} tokens, where "
            "the model itself costs little. Empty: mechscope's `with model.hooks(): model(tokens)` (its "
            "`run_with_cache` refuses a filter that keeps nothing), nnsight's `model.trace` with an empty body, "
            "TransformerLens's `run_with_cache(names_filter=lambda _: False)`. "
            f"×{saves}: keeping the output of every block, as in hook_peers. A tool's fixed cost is its empty "
            f"time minus transformers'; its cost per save is (×{saves} − empty) / {saves}."
        ),
        contenders=contenders,
        ratios=[
            Ratio("mechscope hooks()", "transformers"),
            Ratio("nnsight empty trace", "transformers"),
            Ratio("HookedTransformer empty cache", "transformers"),
            Ratio("mechscope hooks()", "nnsight empty trace", target=1.0),
            Ratio("mechscope hooks()", "HookedTransformer empty cache", target=1.0),
            Ratio(f"mechscope cache ×{saves}", f"nnsight trace ×{saves}", target=1.0),
            Ratio(f"mechscope cache ×{saves}", f"HookedTransformer cache ×{saves}", target=1.0),
        ],
        notes=[*sides.common_notes(), sides.sanity_check()],
        repeats=400,
        warmup=20,
        shuffle=True,
    )
