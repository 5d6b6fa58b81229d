"""Sparse autoencoders: the model (``SparseAutoencoder`` / ``SAE``), its config, the published file formats,
training, evaluation and splicing into a model."""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports

if TYPE_CHECKING:
    from mechscope.sae.config import SAEConfig
    from mechscope.sae.evaluate import LatentDensity, SAEEvaluation, evaluate_sae, plot_latent_density
    from mechscope.sae.formats import SAEFormatError, detect_format
    from mechscope.sae.io import load_sae, save_sae
    from mechscope.sae.latents import SparseLatents
    from mechscope.sae.model import SAE, SAEOutput, SparseAutoencoder
    from mechscope.sae.splice import SAESplice, splice_sae, spliced
    from mechscope.sae.train import TrainConfig, train_sae
else:
    __getattr__, __dir__ = lazy_exports(__name__)

__all__ = [
    "SAE",
    "LatentDensity",
    "SAEConfig",
    "SAEEvaluation",
    "SAEFormatError",
    "SAEOutput",
    "SAESplice",
    "SparseAutoencoder",
    "SparseLatents",
    "TrainConfig",
    "detect_format",
    "evaluate_sae",
    "load_sae",
    "plot_latent_density",
    "save_sae",
    "splice_sae",
    "spliced",
    "train_sae",
]
