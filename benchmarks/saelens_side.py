"""The SAELens contender of ``sae_training.py``, run by the SAELens venv's python (``.venv-saelens``).

    .venv-saelens/bin/python benchmarks/saelens_side.py WORKLOAD.json

``WORKLOAD.json`` names the activations and the initial weights (safetensors) and the settings. The script builds
SAELens's ``TopKTrainingSAE`` and ``SAETrainer``, loads the weights, and prints one JSON line with the losses of a
first step and SAELens's version. Then each ``step`` line on stdin runs one ``SAETrainer.step`` (its real training
step: forward, MSE + AuxK, backward, grad-norm clipping, Adam, lr scheduler) on the next batch and answers ``done``;
end of input ends it. Only the step runs between the question and the answer.
"""

from __future__ import annotations

import sys
from itertools import cycle

import sae_lens
from sae_lens import SAETrainer, TopKTrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from side_protocol import serve, training_spec


def main() -> None:
    spec, batches, init, d_sae, d_in = training_spec(sys.argv[1])
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=spec["k"], aux_loss_coefficient=spec["aux_k_coefficient"])
    )
    sae.load_state_dict(init)
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=10**12,
            train_batch_size_samples=spec["batch_size"],
            lr=spec["lr"],
            lr_end=spec["lr"],  # unused by the constant schedule, but SAETrainer asserts it is set
            dead_feature_window=spec["dead_feature_window"],
        ),
        sae,
        data_provider=iter(()),  # unused: the batches are handed to step() from memory
    )
    data = cycle(batches)

    def step() -> dict[str, float]:
        output = trainer.step(next(data))
        trainer.n_training_steps += 1  # as SAETrainer.fit does after each step
        return {name: float(value.detach()) for name, value in output.losses.items()}

    serve(step, {"losses": step(), "version": sae_lens.__version__})


if __name__ == "__main__":
    main()
