"""SAE training throughput: mechscope's ``Trainer.train_step`` against SAELens's ``SAETrainer.step``, TopK SAE.

Both train the same TopK SAE (d_in 576, SmolLM2-135M's width; d_sae 4608; k 32) from the same initial weights with
Adam (lr 3e-4, constant) on the same batches of 4096 activations, held in memory so that no data loading is timed.
One call is one training step on 4096 tokens, so tokens/s = 4096 / time per call. SAELens runs in its own venv
(``.venv-saelens``, made by ``bash run.sh bench``; its releases pin ``transformer-lens<4``), as a subprocess that
runs one ``SAETrainer.step`` per request (``saelens_side.py``).

Two workloads: with AuxK (every latent counts as dead, so the AuxK term is computed every step; its cost is the same
whenever at least ``aux_k`` = d_in / 2 latents are dead) and without (no latent is dead, so neither computes it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from itertools import cycle
from pathlib import Path

import torch
from harness import Benchmark, Ratio
from safetensors.torch import save_file

from mechscope.sae import SAE, SAEConfig
from mechscope.sae.train import TrainConfig, Trainer, geometric_median

D_IN, D_SAE, K, BATCH, N_BATCHES = 576, 4608, 32, 4096, 4
LR, AUX_K_COEFFICIENT = 3e-4, 1 / 32
WORKLOADS = (("TopK + AuxK", True), ("TopK", False))  # (label, whether AuxK is computed)
SAELENS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-saelens" / "bin" / "python"
SAELENS_SIDE = Path(__file__).resolve().parent / "saelens_side.py"


def activations(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Synthetic residual-stream-like activations ``[n, d]``: heavy-tailed, anisotropic, with two outlier dims.

    Each token is a Gaussian with per-dimension scales spread over two decades, times a log-normal token norm, plus
    a shared mean direction; dims 0 and 1 carry the large values ("massive activations") residual streams have.
    """
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    x = torch.randn(n, d, generator=g) * scales * torch.exp(0.5 * torch.randn(n, 1, generator=g))
    x[:, :2] *= 20.0
    return x + torch.randn(d, generator=g)


def setup() -> Benchmark:
    """Write the shared data and weights, start both SAELens workers, check the first-step losses agree."""
    x = activations(N_BATCHES * BATCH, D_IN)
    torch.manual_seed(0)
    init = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K))
    with torch.no_grad():
        init.b_dec.copy_(geometric_median(x[:BATCH]).float())
    contenders: dict[str, Callable[[], object]] = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-sae-") as tmp:  # the workers read it before answering
        workdir = Path(tmp)
        save_file({"activations": x}, str(workdir / "activations.safetensors"))
        save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(workdir / "init.safetensors"))
        workers = {aux: _saelens(workdir, aux, label) for label, aux in WORKLOADS}
    for label, aux in WORKLOADS:
        mechscope_step, mechscope_losses = _mechscope(init, x, aux)
        saelens_step, saelens_out = workers[aux]
        contenders[f"mechscope {label}"] = mechscope_step
        contenders[f"SAELens {label}"] = saelens_step
        mse = mechscope_losses["mse"], saelens_out["losses"]["mse_loss"]
        line = f"Sanity check, {label}: first-step MSE mechscope {mse[0]:.6g}, SAELens {mse[1]:.6g}"
        if aux:
            aux_terms = mechscope_losses["aux"], saelens_out["losses"]["auxiliary_reconstruction_loss"]
            line += f"; AuxK term mechscope {aux_terms[0]:.6g}, SAELens {aux_terms[1]:.6g}"
        notes.append(line + ".")
        if abs(mse[0] - mse[1]) > 1e-4 * abs(mse[1]):
            raise AssertionError(f"{label}: the two trainers' first-step MSE differ: {mse}")
    version = saelens_out["version"]
    return Benchmark(
        description=(
            f"Throughput of one SAE training step on {BATCH} tokens: mechscope `Trainer.train_step` against SAELens "
            f"{version} `SAETrainer.step` (`TopKTrainingSAE`), TopK SAE d_in {D_IN}, d_sae {D_SAE}, k {K}, float32, "
            f"Adam lr {LR}, same initial weights, same {N_BATCHES} batches in turn (synthetic heavy-tailed "
            "activations, in memory). tokens/s = 4096 / median; a time ratio ≤ 0.67 is a throughput ≥ 1.5× SAELens."
        ),
        contenders=contenders,
        ratios=[Ratio(f"mechscope {label}", f"SAELens {label}", target=1 / 1.5) for label, _ in WORKLOADS],
        notes=[
            "What each step computes. Both: MSE summed over d_in, mean over tokens; AuxK (k_aux = d_in / 2 = 288 "
            f"top dead pre-activations reconstruct the detached residual, coefficient {AUX_K_COEFFICIENT:.4g}); "
            "backward; Adam. mechscope also removes the decoder gradient's component along each decoder row and "
            "renormalises the rows after Adam; SAELens instead divides by the decoder row norms in the forward pass "
            "(`rescale_acts_by_decoder_norm`) and clips the gradient norm to 1. mechscope's AuxK ReLUs the selected "
            "dead pre-activations, SAELens's does not (identical while they are positive).",
            "AuxK workload: every latent counts as dead (mechscope `dead_tokens_threshold=0`, SAELens "
            "`dead_feature_window=-1`). TopK workload: none is dead, so neither computes AuxK.",
            *notes,
        ],
        repeats=20,
        warmup=2,
    )


def _mechscope(init: SAE, x: torch.Tensor, aux: bool) -> tuple[Callable[[], object], dict[str, float]]:
    """mechscope's step on the next batch, and the loss terms of its first step."""
    config = TrainConfig(
        model="synthetic",
        hook_name="x",
        n_tokens=10**12,
        batch_size_tokens=BATCH,
        architecture="topk",
        d_sae=D_SAE,
        k=K,
        lr=LR,
        warmup_steps=0,
        decay_fraction=0.0,
        aux_k_coefficient=AUX_K_COEFFICIENT,
        dead_tokens_threshold=0 if aux else 10**15,
        progress=False,
    )
    sae = SAE(init.cfg).train()
    sae.load_state_dict(init.state_dict())
    trainer = Trainer(config, sae)
    data: Iterator[torch.Tensor] = cycle(x.split(BATCH))
    first = trainer.train_step(next(data))
    return lambda: trainer.train_step(next(data)), first


def _saelens(workdir: Path, aux: bool, label: str) -> tuple[Callable[[], object], dict]:
    """A running SAELens worker's step, and what it printed after its first step (losses, version)."""
    if not SAELENS_PYTHON.exists():
        raise FileNotFoundError(f"{SAELENS_PYTHON} is missing: `bash run.sh bench` creates the SAELens venv")
    spec = {
        "activations": str(workdir / "activations.safetensors"),
        "init": str(workdir / "init.safetensors"),
        "batch_size": BATCH,
        "k": K,
        "lr": LR,
        "aux_k_coefficient": AUX_K_COEFFICIENT,
        "dead_feature_window": -1 if aux else 10**15,
        "threads": torch.get_num_threads(),
    }
    spec_file = workdir / f"spec-{'aux' if aux else 'plain'}.json"
    spec_file.write_text(json.dumps(spec))
    worker = subprocess.Popen(
        [str(SAELENS_PYTHON), str(SAELENS_SIDE), str(spec_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    assert worker.stdin is not None and worker.stdout is not None
    stdin, stdout = worker.stdin, worker.stdout
    first = stdout.readline()
    if not first:
        raise RuntimeError(f"the SAELens worker for {label} exited with {worker.wait()} before its first step")

    def step() -> None:
        stdin.write("step\n")
        stdin.flush()
        if stdout.readline().strip() != "done":
            raise RuntimeError(f"the SAELens worker for {label} stopped (exit code {worker.poll()})")

    return step, json.loads(first)
