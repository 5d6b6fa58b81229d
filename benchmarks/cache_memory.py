"""Peak memory of caching every hook point: mechscope against TransformerLens's ``HookedTransformer`` and nnsight.

The randomly initialised GPT-2-small-shaped model of ``cache_overhead.py`` on a batch of 8×128 tokens. Every
measurement is a fresh child process that loads the model from one ``save_pretrained`` folder, runs one token
through it, then runs the batch once, keeping every hook point, and reports its resident set size just before that
run and its peak during it (:func:`harness.peak_rss`): what the load allocated and freed does not count.

    python benchmarks/cache_memory.py SIDE SPEC.json     # one child of this venv: transformers, mechscope, nnsight

HookedTransformer's children run ``tl_side.py memory`` in the SAELens venv (see ``hook_peers.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from cache_overhead import GPT2_SMALL
from harness import Benchmark, Ratio, peak_rss, storage_bytes
from hook_peers import gpt2, tl_command, tl_spec
from nnsight import NNsight
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from mechscope import HookedModel

BATCH, SEQ = 8, 128
SIDES = ("transformers", "mechscope", "mechscope modules", "nnsight", "HookedTransformer")
#: (mechscope side, its peer): the same hook points on both
PAIRS = (("mechscope", "HookedTransformer"), ("mechscope modules", "nnsight"))
MIB = 2**20
WHAT = ("above the loaded model", "beyond what it keeps", "peak RSS")  # the rows of each side


def tensors_in(value: object) -> list[torch.Tensor]:
    """The tensors of a module's output: a tensor, or tuples, lists and dict-like outputs of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # transformers' ModelOutput is a dict
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def execution_order(hf: PreTrainedModel, tokens: torch.Tensor) -> list[str]:
    """The names of ``hf``'s submodules in the order a forward pass over ``tokens`` finishes them (modules it does
    not call left out): the order in which nnsight lets a trace read their outputs."""
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, module in hf.named_modules()
        if name
    ]
    try:
        hf(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return order


def nnsight_save_all(hf: PreTrainedModel, tokens: torch.Tensor, order: list[str]) -> Callable[[], dict[str, object]]:
    """A ``model.trace`` of ``hf`` saving the output of every submodule in ``order``; it returns them by name."""
    model = NNsight(hf)
    envoys = []
    for name in order:
        envoy = model
        for part in name.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        envoys.append(envoy)

    def trace() -> dict[str, object]:
        saved: list[object] = []  # bound before the trace: nnsight hands back what its body appends
        with model.trace(input_ids=tokens, use_cache=False):
            for envoy in envoys:
                saved.append(envoy.output.save())
        return dict(zip(order, saved, strict=True))

    return trace


def child(side: str, spec: dict) -> dict:
    """One measurement in this process: load, one token, then the batch keeping every hook point (``side``).

    ``bytes`` counts what the run leaves behind: the distinct storages of the kept tensors and of the logits it
    returns (mechscope's ``hook_logits`` is the returned logits; nnsight saves them as ``lm_head``'s output).
    """
    torch.set_num_threads(spec["threads"])
    hf = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval()
    tokens = load_file(spec["tokens"])["tokens"]
    kept: dict[str, object] = {}
    with torch.inference_mode():
        if side == "transformers":
            hf(input_ids=tokens[:1, :1], use_cache=False)
            baseline, peak, output = peak_rss(lambda: hf(input_ids=tokens, use_cache=False))
            logits = [output.logits]
        elif side == "mechscope":
            ms = HookedModel(hf)
            ms(tokens[:1, :1])
            baseline, peak, (output, cache) = peak_rss(lambda: ms.run_with_cache(tokens))
            kept, logits = dict(cache.items()), [output]
        elif side == "mechscope modules":
            ms = HookedModel(hf)
            ms(tokens[:1, :1])
            names = [n for n in ms.hook_names(include_module_points=True) if n.endswith(".hook_result_post")]
            baseline, peak, (output, cache) = peak_rss(lambda: ms.run_with_cache(tokens, names_filter=names))
            kept, logits = dict(cache.items()), [output]
        elif side == "nnsight":
            trace = nnsight_save_all(hf, tokens, execution_order(hf, tokens[:1, :1]))
            baseline, peak, kept = peak_rss(trace)
            logits = []  # a trace returns nothing; the logits are lm_head's saved output
        else:
            raise ValueError(f"side must be one of {SIDES[:-1]}, got {side!r}")
    tensors = [t for value in kept.values() for t in tensors_in(value)]
    answer = {"baseline": baseline, "peak": peak, "tensors": len(tensors), "bytes": storage_bytes(tensors + logits)}
    return answer | {"names": sorted(kept)}


def measure(side: str, spec: Path) -> dict:
    """One fresh child process's measurement of ``side``."""
    if side == "HookedTransformer":
        command, env = tl_command("memory", spec)
    else:
        command, env = [sys.executable, __file__, side, str(spec)], None
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def setup() -> Benchmark:
    """Save the model and tokens, measure each side once to check what they keep, and return the contenders."""
    workdir = tempfile.TemporaryDirectory(prefix="mechscope-bench-memory-")  # the children read it every round
    tokens = torch.randint(0, GPT2_SMALL["vocab_size"], (BATCH, SEQ))
    spec = tl_spec(Path(workdir.name), gpt2(GPT2_SMALL), tokens, [])
    first = {side: measure(side, spec) for side in SIDES}
    ms_names, tl_names = set(first["mechscope"]["names"]), set(first["HookedTransformer"]["names"])
    if ms_names != tl_names | {"hook_logits"}:  # HookedTransformer has no hook point on the logits it returns
        raise AssertionError(f"mechscope and HookedTransformer cache other points: {ms_names ^ tl_names}")

    def contender(side: str) -> Callable[[], dict[str, float]]:
        def call() -> dict[str, float]:
            m = measure(side, Path(workdir.name) / spec.name)  # (the closure keeps the folder alive)
            above = m["peak"] - m["baseline"]
            return {
                f"{side}, {WHAT[0]}": above,
                f"{side}, {WHAT[1]}": above - m["bytes"],
                f"{side}, {WHAT[2]}": m["peak"],
            }

        return call

    kept = ", ".join(f"{side} {first[side]['tensors']} tensors, {first[side]['bytes'] / MIB:.0f} MiB" for side in SIDES)
    return Benchmark(
        description=(
            f"Peak resident memory of one forward pass over a batch of {BATCH}×{SEQ} random tokens through the "
            "randomly initialised GPT-2-small-shaped model of cache_overhead (float32), keeping every hook point: "
            "mechscope `run_with_cache(tokens)` and TransformerLens `HookedTransformer.run_with_cache(tokens)` "
            "(every hook point but `attn.hook_result`, the same names on both, plus mechscope's `hook_logits`); "
            "nnsight `model.trace` saving the output of every submodule the forward pass calls, which is all "
            "nnsight can see (GPT-2's attention pattern, q, k, v are no module's output), against mechscope "
            "`run_with_cache` of the same module outputs (`mechscope modules`: every `<module>.hook_result_post`); "
            "plain transformers without a cache as the floor. Each measurement is a fresh "
            "process: `above the loaded model` is its peak RSS during the run minus its RSS just before it (after "
            "loading the model and one 1-token forward), `beyond what it keeps` that minus the bytes of the tensors "
            "it kept (the tool's own cost), `peak RSS` the process's whole resident size at that peak."
        ),
        contenders={side: contender(side) for side in SIDES},
        ratios=[Ratio(f"{mine}, {what}", f"{peer}, {what}", target=1.0) for mine, peer in PAIRS for what in WHAT],
        notes=[
            f"What each keeps, logits included (distinct storages; a tensor two hook points share counts once): "
            f"{kept}; HookedTransformer keeps the same {len(tl_names)} names as mechscope, whose "
            "`hook_logits` is the logits both return.",
            "The peak is the kernel's high-water mark (`VmHWM`) after resetting it to the current size "
            "(`/proc/self/clear_refs`), so the load's transient peak is not counted (`ru_maxrss` cannot be reset: "
            "it also keeps the peak seen when a thread exited).",
            "Every run is under `torch.inference_mode()`, torch on one thread.",
        ],
        repeats=5,
        warmup=0,
        measures="memory",
    )


if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        print(json.dumps(child(sys.argv[1], json.load(f))), flush=True)
