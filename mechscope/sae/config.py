"""``SAEConfig``: an SAE's shapes, architecture, provenance and input normalisation; it travels with the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.settings import device_problem

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")

# Names as SAELens spells them, so a cfg.json means the same thing in both libraries.
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale", "expected_average_only_in")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float32`` / ``"torch.float32"`` / ``"float32"`` -> ``"float32"``; other dtypes raise a ValueError."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported SAE dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class SAEConfig:
    """Shapes, architecture, provenance and input normalisation of a sparse autoencoder.

    - ``architecture``: ``"relu"`` (ReLU, trained with an L1 penalty), ``"topk"`` (the ``k`` largest pre-activations of
      each token, ReLU'd), ``"batchtopk"`` (the ``k * n_tokens`` largest over a training batch; a per-latent
      ``threshold`` at inference) or ``"jumprelu"`` (a pre-activation passes only above its latent's ``threshold``).
    - ``k``: latents per token for ``topk`` (an int), their mean per token for ``batchtopk``; ``None`` otherwise.
    - ``model_name`` / ``hook_name``: the model and hook point (TransformerLens name) the SAE was trained on.
    - ``apply_b_dec_to_input``: subtract ``b_dec`` from the (normalised) input before encoding.
    - ``normalize_activations``: ``"none"``; ``"layer_norm"`` (OpenAI: each token is centred and divided by its std
      before encoding, and the reconstruction is scaled back by that token's std and mean);
      ``"constant_norm_rescale"`` (each token is scaled to norm ``sqrt(d_in)`` and back); or
      ``"expected_average_only_in"`` (every token is multiplied by the fixed ``scaling_factor``, the reconstruction
      divided by it).
    - ``dtype`` / ``device``: of the parameters; an SAE's ``cfg`` always reports where its weights are now.
    - ``neuronpedia_id``: the SAE's id on Neuronpedia (``"gpt2-small/0-res-jb"``), whose latent ``i`` is at
      ``https://www.neuronpedia.org/{neuronpedia_id}/{i}``; ``None`` when it has none.
    """

    d_in: int
    d_sae: int
    architecture: str = "relu"
    k: int | float | None = None
    model_name: str | None = None
    hook_name: str | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    scaling_factor: float | None = None
    dtype: str = "float32"
    device: str = "cpu"
    neuronpedia_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig.architecture {self.architecture!r} is not one of: {', '.join(ARCHITECTURES)}")
        self._check_k()
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"SAEConfig.normalize_activations {self.normalize_activations!r} is not one of: "
                f"{', '.join(NORMALIZATIONS)}"
            )
        needs_factor = self.normalize_activations == "expected_average_only_in"
        if needs_factor and not (isinstance(self.scaling_factor, (int, float)) and self.scaling_factor > 0):
            raise ValueError(
                "SAEConfig.normalize_activations='expected_average_only_in' needs a positive scaling_factor, "
                f"got {self.scaling_factor!r}"
            )
        if not needs_factor and self.scaling_factor is not None:
            raise ValueError(
                f"SAEConfig.scaling_factor is only used with normalize_activations='expected_average_only_in', "
                f"not {self.normalize_activations!r}: leave it None"
            )
        for name in ("model_name", "hook_name"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"SAEConfig.{name} must be a str or None, got {type(value).__name__} {value!r}")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise TypeError(f"SAEConfig.apply_b_dec_to_input must be True or False, got {self.apply_b_dec_to_input!r}")
        problem = device_problem(self.device) if isinstance(self.device, str) else "it is not a str"
        if problem is not None and self.device != "meta":  # meta: an SAE's shapes without storage
            raise ValueError(f"SAEConfig.device {self.device!r}: {problem}")
        if self.neuronpedia_id is not None and not (isinstance(self.neuronpedia_id, str) and self.neuronpedia_id):
            raise ValueError(f"SAEConfig.neuronpedia_id must be a non-empty str or None, got {self.neuronpedia_id!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    def _check_k(self) -> None:
        k = self.k
        if self.architecture == "topk":
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.d_sae:
                raise ValueError(f"SAEConfig.k must be an int in [1, d_sae={self.d_sae}] for a topk SAE, got {k!r}")
        elif self.architecture == "batchtopk":
            if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < k <= self.d_sae:
                raise ValueError(
                    f"SAEConfig.k (mean active latents per token) must be in (0, d_sae={self.d_sae}] "
                    f"for a batchtopk SAE, got {k!r}"
                )
        elif k is not None:
            raise ValueError(f"SAEConfig.k is only used by topk and batchtopk SAEs, not {self.architecture!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
