"""The EleutherAI sparsify contender of ``sae_training.py``, run by the sparsify venv's python (``.venv-sparsify``).

    .venv-sparsify/bin/python benchmarks/sparsify_side.py WORKLOAD.json

``WORKLOAD.json`` names the activations and the initial weights (mechscope's safetensors: ``W_enc [d_in, d_sae]``,
``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``) and the settings. sparsify's ``Trainer`` has no step function: its
step is the body of a forward hook on the language model (``Trainer.fit``) followed by the optimiser. This script
runs that body on a batch held in memory, as ``fit`` does with ``loss_fn="fvu"``, ``grad_acc_steps=1``,
``micro_acc_steps=1``, one process: the decoder rows set to unit norm, ``SparseCoder.forward`` (its fused TopK
encoder, the embedding-bag decoder sparsify uses without Triton, FVU and AuxK), the loss ``fvu + auxk_alpha *
auxk_loss`` backward, the decoder gradient's component along each row removed, ``torch.optim.Adam`` (what sparsify
picks when bitsandbytes is absent) with its linear warm-up schedule, and the dead-latent counters. It prints one
JSON line with the loss terms of a first step and sparsify's version; then each ``step`` line on stdin runs one step
on the next batch and answers ``done``; end of input ends it.
"""

from __future__ import annotations

import sys
from contextlib import redirect_stdout
from itertools import cycle

import torch
from side_protocol import serve, training_spec
from transformers import get_linear_schedule_with_warmup

with redirect_stdout(sys.stderr):  # sparsify prints which decoder it uses; stdout carries the answers
    import sparsify
    from sparsify import SparseCoder, SparseCoderConfig


def main() -> None:
    spec, batches, init, d_sae, d_in = training_spec(sys.argv[1])
    sae = SparseCoder(d_in, SparseCoderConfig(activation="topk", num_latents=d_sae, k=spec["k"]), dtype=torch.float32)
    with torch.no_grad():
        sae.encoder.weight.copy_(init["W_enc"].T)
        sae.encoder.bias.copy_(init["b_enc"])
        sae.W_dec.copy_(init["W_dec"])
        sae.b_dec.copy_(init["b_dec"])
    auxk_alpha, threshold = spec["auxk_alpha"], spec["dead_feature_threshold"]
    adam = torch.optim.Adam(sae.parameters(), lr=spec["lr"])
    schedule = get_linear_schedule_with_warmup(adam, 0, 10**12)  # Trainer's schedule: warm-up steps, total steps
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
    data = cycle(batches)

    def step() -> dict[str, float]:
        x = next(data)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > threshold if auxk_alpha > 0 else None
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=(x - x.mean(0)).pow(2).sum())
        did_fire = torch.zeros(d_sae, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        terms = {"fvu": float(out.fvu.detach()), "auxk_loss": float(out.auxk_loss.detach())}
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()
        schedule.step()
        with torch.no_grad():
            tokens_since_fired.add_(len(x))
            tokens_since_fired[did_fire] = 0
        return terms

    serve(step, {"losses": step(), "version": sparsify.__version__})


if __name__ == "__main__":
    main()
