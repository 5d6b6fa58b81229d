"""SAE training throughput: mechscope's ``Trainer.train_step`` against SAELens's ``SAETrainer.step`` and
EleutherAI sparsify's training step, TopK SAE.

All train the same TopK SAE (d_in 576, SmolLM2-135M's width; d_sae 4608; k 32) from the same initial weights with
Adam (lr 3e-4, constant) on the same batches of 4096 activations, held in memory so that no data loading is timed.
One call is one training step on 4096 tokens, so tokens/s = 4096 / time per call. SAELens runs in its own venv
(``.venv-saelens``, made by ``bash run.sh bench``; its releases pin ``transformer-lens<4``), as a subprocess that
runs one ``SAETrainer.step`` per request (``saelens_side.py``); sparsify likewise (``.venv-sparsify``: it
installs the newest transformers, above mechscope's bound; ``sparsify_side.py``).

Two workloads: with AuxK (every latent counts as dead, so the AuxK term is computed every step; its cost is the same
whenever at least ``aux_k`` = d_in / 2 latents are dead) and without (no latent is dead, so none computes it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from itertools import cycle
from pathlib import Path

import torch
from harness import Benchmark, Ratio, Step, start_worker
from safetensors.torch import save_file

from mechscope.sae import SAE, SAEConfig
from mechscope.sae.train import TrainConfig, Trainer, geometric_median

D_IN, D_SAE, K, BATCH, N_BATCHES = 576, 4608, 32, 4096, 4
LR, AUX_K_COEFFICIENT = 3e-4, 1 / 32
WORKLOADS = (("TopK + AuxK", True), ("TopK", False))  # (label, whether AuxK is computed)
FLOOR = "floor (encoder product)"
HERE = Path(__file__).resolve().parent
SAELENS_PYTHON, SAELENS_SIDE = HERE.parent / ".venv-saelens" / "bin" / "python", HERE / "saelens_side.py"
SPARSIFY_PYTHON, SPARSIFY_SIDE = HERE.parent / ".venv-sparsify" / "bin" / "python", HERE / "sparsify_side.py"


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
    """Write the shared data and weights, start the peers' workers, check the first-step losses agree."""
    x = activations(N_BATCHES * BATCH, D_IN)
    torch.manual_seed(0)
    init = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K))
    with torch.no_grad():
        init.b_dec.copy_(geometric_median(x[:BATCH]).float())
    variance = float((x[:BATCH] - x[:BATCH].mean(0)).pow(2).sum())  # of the first batch: FVU's denominator
    contenders: dict[str, Callable[[], object]] = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-sae-") as tmp:  # the workers read it before answering
        workdir = Path(tmp)
        save_file({"activations": x}, str(workdir / "activations.safetensors"))
        save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(workdir / "init.safetensors"))
        workers = {
            (peer, aux): start(workdir, aux, label)
            for label, aux in WORKLOADS
            for peer, start in (("SAELens", _saelens), ("sparsify", _sparsify))
        }
    for label, aux in WORKLOADS:
        mechscope_step, mechscope_losses = _mechscope(init, x, aux)
        (saelens_step, saelens_out), (sparsify_step, sparsify_out) = workers["SAELens", aux], workers["sparsify", aux]
        contenders[f"mechscope {label}"] = mechscope_step
        contenders[f"SAELens {label}"] = saelens_step
        contenders[f"sparsify {label}"] = sparsify_step
        # SAELens's terms are means over tokens as mechscope's; sparsify's are divided by the batch's variance
        mse = (
            mechscope_losses["mse"],
            saelens_out["losses"]["mse_loss"],
            sparsify_out["losses"]["fvu"] * variance / BATCH,
        )
        line = (
            f"Sanity check, {label}: first-step MSE mechscope {mse[0]:.6g}, SAELens {mse[1]:.6g}, "
            f"sparsify {mse[2]:.6g} (its FVU {sparsify_out['losses']['fvu']:.6g} x variance / tokens)"
        )
        checked = [("MSE", mse)]
        if aux:
            aux_terms = (
                mechscope_losses["aux"],
                saelens_out["losses"]["auxiliary_reconstruction_loss"],
                AUX_K_COEFFICIENT * sparsify_out["losses"]["auxk_loss"] * variance / BATCH,
            )
            line += f"; AuxK term mechscope {aux_terms[0]:.6g}, SAELens {aux_terms[1]:.6g}, sparsify {aux_terms[2]:.6g}"
            checked.append(("AuxK term", aux_terms))
        notes.append(line + ".")
        for what, values in checked:
            if max(values) - min(values) > 1e-4 * abs(values[0]):
                raise AssertionError(f"{label}: the trainers' first-step {what} differ: {values}")
    contenders[FLOOR] = _encoder_product(init, x)
    versions = saelens_out["version"], sparsify_out["version"]
    return Benchmark(
        description=(
            f"Throughput of one SAE training step on {BATCH} tokens: mechscope `Trainer.train_step` against SAELens "
            f"{versions[0]} `SAETrainer.step` (`TopKTrainingSAE`) and EleutherAI sparsify {versions[1]} (the step "
            f"`sparsify.Trainer.fit` runs, `SparseCoder`), TopK SAE d_in {D_IN}, d_sae {D_SAE}, k {K}, float32, "
            f"Adam lr {LR}, same initial weights, same {N_BATCHES} batches in turn (synthetic heavy-tailed "
            "activations, in memory). tokens/s = 4096 / median; a time ratio ≤ 0.5 is a throughput ≥ 2× the peer."
        ),
        contenders=contenders,
        ratios=[
            *(
                Ratio(f"mechscope {label}", f"{peer} {label}", target=1 / 2)
                for label, _ in WORKLOADS
                for peer in ("SAELens", "sparsify")
            ),
            Ratio(FLOOR, "sparsify TopK"),
            Ratio("mechscope TopK", FLOOR),
        ],
        notes=[
            "What each step computes. All: the squared error summed over d_in; AuxK (k_aux = d_in / 2 = 288 "
            "top dead pre-activations reconstruct the detached residual); backward; Adam. mechscope and SAELens "
            f"average both terms over tokens (AuxK coefficient {AUX_K_COEFFICIENT:.4g}); sparsify divides them by the "
            "batch's total variance (FVU; `auxk_alpha` the same coefficient), which scales the gradient by one "
            "number per batch: the work is the same. mechscope removes the decoder gradient's component along each "
            "decoder row and renormalises the rows after Adam; sparsify does the same (rows set to unit norm before "
            "the forward pass); SAELens instead divides by the decoder row norms in the forward pass "
            "(`rescale_acts_by_decoder_norm`) and clips the gradient norm to 1. mechscope's AuxK ReLUs the selected "
            "dead pre-activations, SAELens's does not (identical while they are positive); sparsify ReLUs all "
            "pre-activations before either selection (identical values). One difference in work: sparsify's AuxK "
            "term trains the decoder only (its fused encoder's backward drops the gradient of the pre-activations "
            "AuxK reads), while mechscope's and SAELens's also train the dead latents' encoder columns.",
            "sparsify's `Trainer` has no step function: `sparsify_side.py` runs the body of the forward hook "
            "`Trainer.fit` installs (on a batch in memory rather than the hooked model's output; the hook's copy and "
            "token mask of that output are left out) and the optimiser step after it, with `torch.optim.Adam` (what "
            "sparsify uses without bitsandbytes; its default optimiser is signum) and its linear schedule without "
            "warm-up. sparsify's first step would set `b_dec` to the batch mean; here all start from the same "
            "weights. Its decoder is `embedding_bag` (Triton, its GPU kernel, is not installed on CPU).",
            "AuxK workload: every latent counts as dead (mechscope `dead_tokens_threshold=1` with every counter set "
            "to 1 before each step, SAELens `dead_feature_window=-1`, sparsify `dead_feature_threshold=-1`). TopK "
            "workload: none is dead, so none computes AuxK (sparsify: `auxk_alpha=0`).",
            f"{FLOOR}: the one dense product of every contender's step, `x @ W_enc` ([{BATCH}, {D_IN}] x [{D_IN}, "
            f"{D_SAE}], float32, one thread); no TopK step can take less. `{FLOOR} / sparsify TopK` is the smallest "
            "ratio any TopK step could reach against sparsify.",
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
        dead_tokens_threshold=1 if aux else 10**15,
        progress=False,
    )
    sae = SAE(init.cfg).train()
    sae.load_state_dict(init.state_dict())
    trainer = Trainer(config, sae)
    data: Iterator[torch.Tensor] = cycle(x.split(BATCH))

    def step() -> dict[str, float]:
        if aux:  # every latent silent for the threshold's one token: all dead, as the peers are told
            trainer.tokens_since_fired.fill_(1)
        return trainer.train_step(next(data))

    return step, step()


def _encoder_product(init: SAE, x: torch.Tensor) -> Callable[[], object]:
    """The encoder's dense product on the next batch, alone."""
    weight = init.W_enc.detach().clone()
    data: Iterator[torch.Tensor] = cycle(x.split(BATCH))
    return lambda: next(data) @ weight


def _saelens(workdir: Path, aux: bool, label: str) -> tuple[Step, dict]:
    """A running SAELens worker's step, and what it printed after its first step (losses, version)."""
    spec = {
        **_shared_spec(workdir),
        "aux_k_coefficient": AUX_K_COEFFICIENT,
        "dead_feature_window": -1 if aux else 10**15,
    }
    spec_file = workdir / f"saelens-{'aux' if aux else 'plain'}.json"
    return start_worker(SAELENS_PYTHON, SAELENS_SIDE, spec, spec_file, f"SAELens {label}")


def _sparsify(workdir: Path, aux: bool, label: str) -> tuple[Step, dict]:
    """A running sparsify worker's step, and what it printed after its first step (losses, version)."""
    spec = {
        **_shared_spec(workdir),
        "auxk_alpha": AUX_K_COEFFICIENT if aux else 0.0,  # 0: sparsify passes no dead mask, so no AuxK
        "dead_feature_threshold": -1,  # every latent's count (>= 0) is above it: all dead
    }
    spec_file = workdir / f"sparsify-{'aux' if aux else 'plain'}.json"
    return start_worker(SPARSIFY_PYTHON, SPARSIFY_SIDE, spec, spec_file, f"sparsify {label}")


def _shared_spec(workdir: Path) -> dict[str, object]:
    """What every worker reads: the data and initial weights in ``workdir``, the shapes, Adam's lr, the threads."""
    return {
        "activations": str(workdir / "activations.safetensors"),
        "init": str(workdir / "init.safetensors"),
        "batch_size": BATCH,
        "k": K,
        "lr": LR,
        "threads": torch.get_num_threads(),
    }
