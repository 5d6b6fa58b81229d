"""SAE training: ``TrainConfig`` and ``train_sae(config, model=None, store=None) -> SparseAutoencoder``.

One step on a batch ``x [batch, d_in]``::

    pre_acts = (x - b_dec) @ W_enc + b_enc                   # [batch, d_sae]
    latents  = activation(pre_acts)                          # by architecture, below
    loss     = ||x - latents @ W_dec - b_dec||^2 (summed over d_in, mean over the batch) + architecture term

    relu:      + l1_coefficient * sum_i |z_i| * ||W_dec_i||                         (L1 weighted by decoder norms)
    topk,
    batchtopk: + aux_k_coefficient * ||e - topk_aux(dead pre_acts) @ W_dec||^2   (AuxK, Gao et al. 2024: e = x - x_hat,
               detached; only latents that have not fired in the last dead_tokens_threshold tokens take part)
    jumprelu:  + l0_coefficient * sum_i H(pre_acts_i - threshold_i)           (L0, Rajamanoharan et al. 2024)

A TopK step computes the same losses and gradients, but after the encoder's dense product it touches only each
token's selected latents (``Trainer._topk_losses``): sparse decoding and gradients that skip the ``[batch, d_sae]``
zeros.

JumpReLU's threshold gets gradients through straight-through estimators with a rectangle kernel of width
``jumprelu_bandwidth``: d/dθ [z H(z - θ)] := -(θ/ε) rect((z - θ)/ε) and d/dθ H(z - θ) := -(1/ε) rect((z - θ)/ε); the
gradient of the step with respect to z is 0 and that of the JumpReLU is H(z - θ). BatchTopK's inference threshold
is an exponential running mean (rate ``batchtopk_threshold_lr``) of the smallest positive activation the batch
selection kept, one value for all latents, as SAELens's ``BatchTopKTrainingSAE`` and Bussmann et al. do.

After each backward pass the decoder gradient's component along each row is removed, Adam steps, and the decoder rows
are scaled back to unit norm. ``b_dec`` starts at the geometric median of the first batch. The learning rate warms up
linearly over ``warmup_steps`` and decays linearly to 0 over the last ``decay_fraction`` of the steps.

``out_dir`` receives ``sae/`` (the trained SAE, ``SparseAutoencoder.save``), ``metrics.jsonl`` (one line per log step),
``train_config.json`` and ``checkpoint/`` (the SAE, plus ``trainer.safetensors`` with the Adam state, the torch RNG
state and the dead-latent counters, and ``trainer.json`` with the step and Adam's hyper-parameters; no pickle). Every
file is written atomically and the checkpoint replaced as a whole (``mechscope.files``). ``resume=True`` continues from
that checkpoint (``find_checkpoint``): with the same data order the result equals an uninterrupted run.

Under ``torchrun`` (``mechscope sae train CONFIG --nproc N``) the ranks share every batch: each computes the losses
of its rows, and the gradients and the step's statistics (firing latents, BatchTopK's selection and threshold, the
metrics) are combined over the ranks (``Trainer.train_step``), so N ranks at ``batch_size_tokens`` B train the SAE
one process trains at B, and a checkpoint resumes under any number of ranks (docs/distributed.md). With
``shard_latents`` (TopK only) the ranks instead split the latents, each holding ``d_sae / N`` of them and computing
every row (``ShardedTrainer``, :mod:`mechscope.sae.sharded`): for SAEs too wide for one device; the same SAE again.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import warnings
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

import mechscope.distributed as distributed
from mechscope.data.store import ActivationStore
from mechscope.files import (
    DamagedFile,
    atomic_dir,
    atomic_write,
    atomic_write_text,
    check_output_dir,
    check_settings,
    clean_directory,
    read_json,
    read_safetensors,
    reading,
    recover_dir,
)
from mechscope.interrupts import Cadence, stop_on_signals
from mechscope.models.hooked import HookedModel
from mechscope.sae.config import ARCHITECTURES, DTYPES, SAEConfig
from mechscope.sae.formats import REFETCH, SAEFormatError, WriteFile
from mechscope.sae.kernels import JumpReLU, SelectedPreActs, SparseDecode, Step, top_indices
from mechscope.sae.latents import SparseLatents
from mechscope.sae.model import SparseAutoencoder
from mechscope.sae.sharded import LatentShard
from mechscope.settings import (
    Config,
    ConfigError,
    above,
    at_least,
    between,
    check_device,
    check_fields,
    fail,
    label,
    meta,
)

CHECKPOINT_DIR = "checkpoint"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
SAE_DIR = "sae"
# Fields a resumed run may change: they do not affect the weights it produces.
RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "log_every",
    "checkpoint_every",
    "checkpoint_seconds",
    "out_dir",
    "shard_latents",
}


@dataclass
class TrainConfig(Config):
    """Everything a training run needs; ``mechscope sae train`` has one flag per field (``--hook-name`` ...), and
    ``TrainConfig.from_toml(path, **overrides)`` reads a TOML file of fields (top-level keys)."""

    model: str = field(default="smollm2-135m", metadata=meta("model: short name, hub id, local dir or .gguf"))
    hook_name: str = field(default="blocks.15.hook_resid_post", metadata=meta("hook point to train on"))
    corpus: str | None = field(
        default=None, metadata=meta("corpus (mechscope.data.iter_texts); default: embedded", old="source")
    )
    activations_dir: str | None = field(
        default=None, metadata=meta("harvest activations to disk shards here first", old="shard_dir")
    )
    context_length: int = field(default=128, metadata=meta("tokens per context"))
    batch_contexts: int = field(default=8, metadata=meta("contexts per forward pass of the model"))
    n_tokens: int = field(default=2_000_000, metadata=meta("training tokens; steps = n_tokens // batch_size_tokens"))
    batch_size_tokens: int = field(default=4096, metadata=meta("tokens per step", old="batch_size"))
    architecture: str = field(default="topk", metadata=meta(f"one of {', '.join(ARCHITECTURES)}"))
    d_sae: int | None = field(default=None, metadata=meta("latents; default: expansion_factor * d_in"))
    expansion_factor: int = field(default=8, metadata=meta("d_sae / d_in when d_sae is not given"))
    k: float | None = field(default=32, metadata=meta("latents per token (topk: an int; batchtopk: the mean)"))
    l1_coefficient: float = field(default=5.0, metadata=meta("relu: weight of the decoder-norm weighted L1"))
    l0_coefficient: float = field(default=1e-3, metadata=meta("jumprelu: weight of the L0 penalty"))
    jumprelu_bandwidth: float = field(default=1e-3, metadata=meta("jumprelu: width of the STE rectangle kernel"))
    jumprelu_init_threshold: float = field(default=1e-3, metadata=meta("jumprelu: initial threshold"))
    batchtopk_threshold_lr: float = field(default=0.01, metadata=meta("batchtopk: rate of the threshold's mean"))
    aux_k: int | None = field(default=None, metadata=meta("topk/batchtopk: dead latents in AuxK; default d_in // 2"))
    aux_k_coefficient: float = field(default=1 / 32, metadata=meta("topk/batchtopk: weight of the AuxK loss"))
    dead_tokens_threshold: int = field(default=1_000_000, metadata=meta("a latent silent this many tokens is dead"))
    lr: float = field(default=3e-4, metadata=meta("Adam learning rate"))
    adam_beta1: float = field(default=0.9, metadata=meta("Adam beta1"))
    adam_beta2: float = field(default=0.999, metadata=meta("Adam beta2"))
    warmup_steps: int = field(default=100, metadata=meta("linear learning-rate warm-up steps"))
    decay_fraction: float = field(default=0.2, metadata=meta("final fraction of steps decaying the lr to 0"))
    seed: int = field(default=0, metadata=meta("seeds the SAE initialisation and the data order"))
    shuffle_buffer: int = field(default=65536, metadata=meta("rows mixed at a time (0: corpus order)"))
    out_dir: str = field(default="sae_runs/run", metadata=meta("where sae/, metrics.jsonl and checkpoint/ go"))
    checkpoint_every: int = field(default=200, metadata=meta("steps between checkpoints (0: not by steps)"))
    checkpoint_seconds: float = field(
        default=300.0, metadata=meta("seconds between checkpoints (0: not by time); Ctrl-C writes one too")
    )
    log_every: int = field(default=50, metadata=meta("steps between metrics lines"))
    resume: bool = field(default=False, metadata=meta("continue from out_dir/checkpoint"))
    progress: bool = field(default=True, metadata=meta("show a progress bar"))
    device: str = field(default="cpu", metadata=meta("device of the SAE (and of a model loaded by name)"))
    dtype: str = field(default="float32", metadata=meta(f"SAE dtype: one of {', '.join(DTYPES)}"))
    shard_latents: bool = field(
        default=False, metadata=meta("topk under torchrun: each rank holds d_sae / N latents, not the whole SAE")
    )

    LABEL: ClassVar[str] = "TrainConfig."

    def __post_init__(self) -> None:
        check_fields(self)
        if self.architecture not in ARCHITECTURES:
            raise fail(self, "architecture", f"{self.architecture!r} is not one of: {', '.join(ARCHITECTURES)}")
        at_least(self, 1, "n_tokens", "batch_size_tokens", "context_length", "batch_contexts")
        at_least(self, 1, "expansion_factor", "log_every", "d_sae", "aux_k", "dead_tokens_threshold")
        at_least(self, 0, "warmup_steps", "checkpoint_every", "checkpoint_seconds", "shuffle_buffer")
        at_least(self, 0, "l1_coefficient", "l0_coefficient", "aux_k_coefficient", "jumprelu_init_threshold")
        above(self, 0, "lr", "jumprelu_bandwidth", "batchtopk_threshold_lr")
        between(self, 0, 1, "batchtopk_threshold_lr")
        between(self, 0, 1, "adam_beta1", "adam_beta2", high_open=True)
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None:
                raise fail(self, "k", f"is required for a {self.architecture} SAE: give the latents per token, e.g. 32")
            above(self, 0, "k")
            if self.architecture == "topk" and self.k != int(self.k):
                raise fail(self, "k", f"must be a whole number for a topk SAE, got {self.k!r}")
            if self.d_sae is not None and self.k > self.d_sae:
                raise fail(self, "k", f"is {self.k}, more than d_sae={self.d_sae}: lower k or raise d_sae")
        else:
            self.k = None  # only topk/batchtopk use k, and SAEConfig refuses it elsewhere
        if not self.out_dir:
            raise fail(self, "out_dir", "is empty: give the directory the run writes to")
        if not self.model:
            raise fail(self, "model", "is empty: give a short name, hub id, local dir or .gguf")
        check_device(self, "device")
        if self.n_tokens < self.batch_size_tokens:
            raise ConfigError(
                f"{label(self, 'n_tokens')}={self.n_tokens} is less than one batch ({self.batch_size_tokens})",
                field="n_tokens",
            )
        if not 0 <= self.decay_fraction <= 1:
            raise fail(self, "decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")
        if self.dtype not in DTYPES:
            raise fail(self, "dtype", f"{self.dtype!r} is not one of: {', '.join(DTYPES)}")
        if self.shard_latents and self.architecture != "topk":
            raise fail(
                self,
                "shard_latents",
                f"splits the latents of topk SAEs only, not {self.architecture!r}: set architecture='topk', or "
                "shard_latents=False to share the rows instead",
            )

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size_tokens


# ---- pieces --------------------------------------------------------------------------------------------------


def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point ``[d]`` minimising the sum of Euclidean distances to ``points [n, d]`` (Weiszfeld iterations).

    Starts at the mean; each iteration is the average of the points weighted by 1 / distance (distances are clamped
    away from 0, so an iterate landing on a data point stays finite). Stops when a step moves less than ``tol``
    times the data's scale.
    """
    points = points.double()
    median = points.mean(dim=0)
    scale = (points - median).norm(dim=1).mean().clamp_min(1e-30)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-12 * scale)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (new - median).norm()
        median = new
        if moved < tol * scale:
            break
    return median


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, constant, linear decay to 0 at the end."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    decay_steps = int(config.n_steps * config.decay_fraction)
    remaining = config.n_steps - step
    decay = min(1.0, remaining / decay_steps) if decay_steps else 1.0
    return config.lr * warmup * decay


class BatchSource(Protocol):
    """What ``train_sae`` reads: an ``ActivationStore`` or anything with the same ``batches`` method."""

    def batches(
        self, batch_size: int, n_tokens: int | None = None, shuffle_buffer: int = 0, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]: ...


class Trainer:
    """The state of one run: the SAE, Adam, the step, and the tokens since each latent last fired.

    Under torchrun every rank holds the whole SAE and computes its share of the rows (:meth:`row_share`); the
    ranks' gradients and statistics are summed (:meth:`combine_gradients`, :meth:`combine_statistics`).
    ``ShardedTrainer`` splits the latents instead. ``d_sae``: the whole SAE's latents (default ``sae``'s)."""

    def __init__(self, config: TrainConfig, sae: SparseAutoencoder, d_sae: int | None = None) -> None:
        self.config, self.sae = config, sae
        self.params = [p for _, p in sorted(sae.named_parameters())]
        fused = sae.W_dec.device.type in ("cpu", "cuda")  # one pass over each tensor (foreach: about ten on CPU)
        betas = (config.adam_beta1, config.adam_beta2)
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=betas, fused=fused or None)
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.d_sae = sae.cfg.d_sae if d_sae is None else d_sae
        self.aux_k = min(config.aux_k or sae.cfg.d_in // 2 or 1, self.d_sae)

    def dead(self) -> Tensor:
        """Boolean ``[d_sae]``: latents that have not fired in the last ``dead_tokens_threshold`` tokens."""
        return self.tokens_since_fired >= self.config.dead_tokens_threshold

    def losses(
        self, x: Tensor, batch_size: int | None = None
    ) -> tuple[dict[str, Tensor], Tensor | SparseLatents, Tensor]:
        """The loss terms of the rows ``x [rows, d_in]``, their latents and their reconstruction ``[rows, d_in]``.

        The latents are ``[rows, d_sae]``, or for ``topk`` the ``SparseLatents`` (``[rows, k]`` each). Each term is a
        sum over the rows divided by ``batch_size``, the rows of the whole batch (default ``len(x)``: the mean), so
        the terms of the ranks' shares of a batch add up to the batch's (:meth:`train_step`).
        """
        cfg, sae = self.config, self.sae
        n = len(x) if batch_size is None else batch_size
        if cfg.architecture == "topk":
            return self._topk_losses(x, n)
        pre_acts, _ = sae.pre_acts(x)
        if cfg.architecture == "jumprelu":
            latents = JumpReLU.apply(pre_acts, sae.threshold, cfg.jumprelu_bandwidth)
        elif cfg.architecture == "batchtopk":
            latents = self.batch_topk(pre_acts, n)
        else:
            latents = sae.activation(pre_acts)
        recon = sae.decode(latents, x=x)
        error = x - recon
        terms = {"mse": error.pow(2).sum() / n}
        if cfg.architecture == "relu":
            terms["l1"] = cfg.l1_coefficient * (latents.abs() * sae.W_dec.norm(dim=-1)).sum() / n
        elif cfg.architecture == "jumprelu":
            terms["l0"] = cfg.l0_coefficient * Step.apply(pre_acts, sae.threshold, cfg.jumprelu_bandwidth).sum() / n
        else:
            dead = self.dead()
            if dead.any():
                terms["aux"] = cfg.aux_k_coefficient * self.aux_loss(pre_acts, error.detach(), dead, n)
        return terms, latents, recon

    def batch_topk(self, pre_acts: Tensor, batch_size: int) -> Tensor:
        """BatchTopK latents ``[rows, d_sae]`` of these rows' ``pre_acts [rows, d_sae]``: the ``k * batch_size``
        largest positive pre-activations of the whole batch of ``batch_size`` rows are kept, the others are 0.

        Under torchrun the batch is every rank's rows: each rank sends its own ``k * batch_size`` largest values
        (the batch's largest are among them), and every rank keeps its entries at or above the batch's smallest
        kept value, so the ranks select together what one process selects on the whole batch."""
        k = self.sae.cfg.k
        assert k is not None, "a batchtopk SAE has a k"
        total = int(k * batch_size)
        with torch.no_grad():
            flat = pre_acts.flatten()
            largest = flat.topk(min(total, len(flat)), sorted=False).values
            if distributed.world_size() > 1:
                every_rank = torch.cat(distributed.all_gather(largest))
                largest = every_rank.topk(min(total, len(every_rank)), sorted=False).values
            smallest = largest.min() if len(largest) else flat.new_tensor(float("inf"))
        keep = (pre_acts >= smallest) & (pre_acts > 0)
        return torch.where(keep, pre_acts, torch.zeros_like(pre_acts))

    def _topk_losses(self, x: Tensor, n: int) -> tuple[dict[str, Tensor], SparseLatents, Tensor]:
        """``losses`` of a TopK SAE, touching only the selected latents after the encoder's one dense product.

        The same terms as the dense computation (the other architectures' path, and AuxK's ``aux_loss``), but the
        decoder reads the ``k`` (and AuxK's ``aux_k``) selected rows of ``W_dec`` per token, and the backward pass
        sends gradients only through the selected pre-activations (``SelectedPreActs``) instead of multiplying
        ``[batch, d_sae]`` matrices that are almost all zeros.
        """
        cfg, sae = self.config, self.sae
        k = sae.cfg.k
        assert isinstance(k, int), "a topk SAE's k is an int"
        encoder_input, stats = sae.encoder_input(x)
        with torch.no_grad():
            products = encoder_input @ sae.W_enc  # [batch, d_sae], no graph; the pre-activations less b_enc
            indices = top_indices(products, k, bias=sae.b_enc)
            dead = self.dead()
            if dead.any():
                indices = torch.cat([indices, self.aux_indices(products, dead, bias=sae.b_enc)], dim=-1)
        selected = SelectedPreActs.apply(encoder_input, sae.W_enc, sae.b_enc, indices, products).relu()
        latents = SparseLatents(indices[:, :k], selected[:, :k])
        recon = sae.denormalize(SparseDecode.apply(*latents, sae.W_dec) + sae.b_dec, stats)
        error = x - recon
        terms = {"mse": error.pow(2).sum() / n}
        if indices.shape[-1] > k:
            aux_recon = SparseDecode.apply(indices[:, k:], selected[:, k:], sae.W_dec)
            terms["aux"] = cfg.aux_k_coefficient * (error.detach() - aux_recon).pow(2).sum() / n
        return terms, latents, recon

    def aux_indices(self, pre_acts: Tensor, dead: Tensor, bias: Tensor | None = None) -> Tensor:
        """``[batch, min(aux_k, dead latents)]``: each token's largest pre-activations ``[batch, d_sae]`` (plus
        ``bias [d_sae]`` when given) among the ``dead`` latents."""
        return top_indices(pre_acts, min(self.aux_k, int(dead.sum())), among=dead, bias=bias)

    def aux_loss(self, pre_acts: Tensor, error: Tensor, dead: Tensor, batch_size: int | None = None) -> Tensor:
        """AuxK: how well the ``aux_k`` largest dead pre-activations ``[rows, d_sae]`` reconstruct ``error``: the
        squared error summed over the rows, divided by ``batch_size`` (default: the rows)."""
        indices = self.aux_indices(pre_acts, dead)
        aux_latents = torch.zeros_like(pre_acts).scatter_(-1, indices, pre_acts.gather(-1, indices).relu())
        n = len(pre_acts) if batch_size is None else batch_size
        return (error - aux_latents @ self.sae.W_dec).pow(2).sum() / n

    def train_step(self, batch: Tensor) -> dict[str, float]:
        """One optimiser step on the batch ``batch [batch, d_in]``; returns its metrics.

        Under torchrun every rank is given the same batch and computes the losses of its share of the rows (every
        ``world_size``-th from its rank, :func:`~mechscope.distributed.share`); the gradients, the firing latents,
        the loss terms and the L0 are summed over the ranks, so that every rank takes the step one process takes on
        the whole batch (the decoder's normalisation, the dead latents, AuxK's and BatchTopK's selections and
        thresholds all see the whole batch).
        """
        cfg, sae = self.config, self.sae
        n = len(batch)
        share = self.row_share(n)
        x = batch[share.start :: share.step]
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        terms, latents, _ = self.losses(x, n)
        loss = cast(Tensor, sum(terms.values()))  # terms always holds "mse"
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.combine_gradients()
        sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            if isinstance(latents, SparseLatents):  # topk
                values = latents.values.detach()  # [rows, k]
                active = values > 0
                fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=values.device)
                fired[latents.indices[active]] = True
            else:  # the other architectures keep dense latents in training: faster than gathering them
                values = latents.detach()  # [rows, d_sae]
                active = values > 0
                fired = active.any(dim=0)
            sums = torch.cat([fired.double(), torch.stack([*terms.values(), active.sum()]).detach().double()])
            sums = self.combine_statistics(sums)  # [d_sae + terms + 1]: firing ranks, the terms, the L0
            if cfg.architecture == "jumprelu":
                sae.threshold.clamp_min_(0.0)
            elif cfg.architecture == "batchtopk":
                own_smallest = values[active].min() if active.any() else values.new_tensor(float("inf"))
                smallest = -distributed.all_reduce_max(-own_smallest)  # of the whole batch's selection
                if smallest.isfinite():
                    rate = cfg.batchtopk_threshold_lr if self.step > 0 else 1.0
                    sae.threshold.lerp_(smallest.expand_as(sae.threshold), rate)
            self.tokens_since_fired += n
            self.tokens_since_fired[sums[: sae.cfg.d_sae] > 0] = 0
        self.step += 1
        batch_terms = dict(zip(terms, sums[sae.cfg.d_sae : -1].tolist(), strict=True))
        return self.metrics(batch, batch_terms, float(sums[-1]) / n, lr)

    def row_share(self, n: int) -> range:
        """The rows of a batch of ``n`` this rank computes: every ``world_size``-th from its rank
        (:func:`~mechscope.distributed.share`)."""
        return distributed.share(n)

    def combine_gradients(self) -> None:
        """Make each gradient the whole batch's: the sum of the ranks'
        (:func:`~mechscope.distributed.sum_gradients_`)."""
        distributed.sum_gradients_(self.params)

    def combine_statistics(self, sums: Tensor) -> Tensor:
        """The whole batch's step statistics ``[d_sae + terms + 1]`` (per latent whether it fired, the loss terms,
        the active latents) from this rank's: their sum over the ranks."""
        return distributed.all_reduce_sum(sums)

    def dead_share(self) -> float:
        """The share of the SAE's latents that are dead (:meth:`dead`)."""
        return float(self.dead().float().mean())

    def metrics(self, batch: Tensor, terms: dict[str, float], l0: float, lr: float) -> dict[str, float]:
        """Step, tokens, loss and its ``terms`` (of the whole batch), ``l0``, the FVU ``||x - x_hat||^2 / ||x -
        mean(x)||^2`` of the ``batch [batch, d_in]``, the dead share and ``lr`` of a step."""
        x = batch.to(self.sae.W_dec.dtype)
        fvu = terms["mse"] * len(x) / float((x - x.mean(dim=0)).pow(2).sum())
        out = {"step": self.step, "tokens": self.step * self.config.batch_size_tokens, "loss": sum(terms.values())}
        out.update(terms)
        out.update(l0=l0, fvu=fvu, dead=self.dead_share())
        if self.config.architecture in ("jumprelu", "batchtopk"):
            out["mean_threshold"] = float(self.sae.threshold.detach().mean())
        out["lr"] = lr
        return out

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def position(self) -> dict[str, int]:
        """Where this rank is in the data: the batches done, and its rows of each batch (every ``row_step``-th from
        ``first_row``). The ranks read the same batches, so a run resumes at ``batches_done`` under any number of
        ranks."""
        rows = self.row_share(self.config.batch_size_tokens)
        return {"rank": distributed.rank(), "batches_done": self.step, "first_row": rows.start, "row_step": rows.step}

    def save_checkpoint(self, directory: Path, write_file: WriteFile = atomic_write) -> Path:
        """Write the SAE, Adam's state, the RNG state and the counters to ``directory``, which is replaced as a whole
        (:func:`mechscope.files.atomic_dir`); each file is written by ``write_file`` (see :func:`train_sae`).

        Under torchrun every rank calls it: rank 0 writes (the ranks hold the same state), with every rank's
        :meth:`position` in ``trainer.json``, and the others wait until it has."""
        positions = distributed.gather_to_main([self.position()], operator.add)
        whole = self.whole()
        if positions is not None:
            if len({p["batches_done"] for p in positions}) != 1:
                raise RuntimeError(f"the ranks are at different steps ({positions}): train again with --resume")
            assert whole is not None  # rank 0 holds the whole state
            atomic_dir(directory, lambda tmp: whole._write_checkpoint(tmp, write_file, positions))
        distributed.barrier()
        return directory

    def whole(self) -> Trainer | None:
        """The state of the whole SAE, as one process holds it (on rank 0; None on the others): this trainer."""
        return self

    def whole_sae(self) -> SparseAutoencoder | None:
        """The whole SAE (on rank 0; None on the others): this trainer's."""
        return self.sae

    def _write_checkpoint(self, directory: Path, write_file: WriteFile, positions: list[dict[str, int]]) -> None:
        self.sae.save(directory / SAE_DIR, write_file=write_file)
        state = self.optimizer.state_dict()
        tensors = {
            f"adam.{index}.{key}": value.contiguous()
            for index, param_state in state["state"].items()
            for key, value in param_state.items()
        }
        tensors.update(torch_rng=torch.get_rng_state(), tokens_since_fired=self.tokens_since_fired.cpu())
        write_file(directory / TRAINER_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "step": self.step,
            "param_groups": state["param_groups"],
            "config": dataclasses.asdict(self.config),
            "ranks": positions,
        }
        write_file(directory / TRAINER_JSON, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what ``save_checkpoint`` wrote (the SAE's weights, Adam, RNG, counters, step); a checkpoint of a
        run with other settings (outside ``RESUMABLE_CHANGES``) raises a :class:`~mechscope.files.SettingsMismatch`
        listing them."""
        fix = f"delete {directory} to train from scratch, or choose another out_dir"
        meta = read_json(directory / TRAINER_JSON, fix)
        with reading(directory / TRAINER_JSON, fix):
            if not {"config", "step", "param_groups"} <= set(meta):
                raise KeyError("config, step or param_groups")
        check_settings(
            current_names(meta["config"]),
            dataclasses.asdict(self.config),
            where=directory,
            what="was written by a run",
            fix="resume with the checkpoint's settings, or train from scratch in another out_dir",
            labels="checkpoint, now",
            ignore=RESUMABLE_CHANGES,
        )
        device, dtype = self.sae.W_dec.device, self.sae.W_dec.dtype
        try:
            saved = SparseAutoencoder.load(directory / SAE_DIR, device=device, dtype=dtype)
        except SAEFormatError as e:  # the loader's fix is for a downloaded SAE; a checkpoint's is to start over
            raise DamagedFile(f"{str(e).removesuffix(REFETCH)}: {fix}") from e
        self.sae.load_state_dict(saved.state_dict())
        tensors = read_safetensors(directory / TRAINER_TENSORS, str(self.sae.W_dec.device), fix)
        adam_state: dict[int, dict[str, Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, index, key = name.split(".", 2)
                adam_state.setdefault(int(index), {})[key] = value.cpu() if key == "step" else value
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": adam_state, "param_groups": groups})
        torch.set_rng_state(tensors["torch_rng"].cpu())
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.tokens_since_fired.device)
        self.step = meta["step"]


class ShardedTrainer(Trainer):
    """A TopK run whose ranks split the latents (``shard_latents``): each holds its block of them as ``sae``
    (:class:`~mechscope.sae.sharded.LatentShard`), with their Adam state and dead-latent counters, and computes every
    row of each batch. It takes the steps one process takes training the whole SAE of ``sae_cfg``, from the same
    start: the whole SAE is drawn on the CPU (as one process on the CPU draws it), then each rank keeps its block.

    Checkpoints and the saved SAE are the whole SAE's, put together on rank 0 (:meth:`whole`): a run resumes under
    any number of ranks, sharded or not."""

    def __init__(self, config: TrainConfig, sae_cfg: SAEConfig) -> None:
        shard = LatentShard(sae_cfg)
        whole = SparseAutoencoder(dataclasses.replace(sae_cfg, device="cpu"))
        super().__init__(config, shard.local_sae(whole, sae_cfg.device), sae_cfg.d_sae)
        shard.check_room(self.aux_k)
        self.shard = shard

    def _topk_losses(self, x: Tensor, n: int) -> tuple[dict[str, Tensor], SparseLatents, Tensor]:
        """The whole SAE's TopK terms, this rank's selected latents and the reconstruction
        (:meth:`~mechscope.sae.sharded.LatentShard.losses`)."""
        return self.shard.losses(self.sae, x, n, self.dead(), self.aux_k, self.config.aux_k_coefficient)

    def row_share(self, n: int) -> range:
        """Every row: each rank computes the whole batch, for its latents."""
        return range(n)

    def combine_gradients(self) -> None:
        """Nothing: each rank's latents' gradients are its own, and ``b_dec``'s is already the same on every rank
        (:mod:`mechscope.sae.sharded`)."""

    def combine_statistics(self, sums: Tensor) -> Tensor:
        """Each rank's latents' firing is its own and every rank computed the whole batch's loss terms: only the
        active latents (the last entry) are summed over the ranks."""
        return torch.cat([sums[:-1], distributed.all_reduce_sum(sums[-1:])])

    def dead_share(self) -> float:
        """The share of the whole SAE's latents that are dead."""
        return float(distributed.all_reduce_sum(self.dead().sum())) / self.d_sae

    def whole(self) -> Trainer | None:
        """The whole run's state put together on rank 0, on the CPU: a plain :class:`Trainer` of the whole SAE, with
        Adam's state, the counters and the step (None on the other ranks). Every rank must call it."""
        gathered = self.shard.gather(_run_state(self))
        if gathered is None:
            return None
        names = [name for name, _ in sorted(self.sae.named_parameters())]
        whole = Trainer(self.config, SparseAutoencoder.from_tensors(self.shard.cfg, {n: gathered[n] for n in names}))
        _restore(whole, gathered, like=self)
        return whole

    def whole_sae(self) -> SparseAutoencoder | None:
        """The whole SAE put together on rank 0, on the CPU (None on the other ranks). Every rank must call it."""
        gathered = self.shard.gather(_run_state(self, adam=False))
        return None if gathered is None else SparseAutoencoder.from_tensors(self.shard.cfg, gathered)

    def load_checkpoint(self, directory: Path) -> None:
        """Restore this rank's block of a checkpoint (of the whole run, which each rank reads on the CPU first)."""
        whole = Trainer(self.config, SparseAutoencoder(dataclasses.replace(self.shard.cfg, device="cpu")))
        whole.load_checkpoint(directory)
        _restore(self, self.shard.take(_run_state(whole)), like=whole)


def _run_state(trainer: Trainer, adam: bool = True) -> dict[str, Tensor]:
    """A trainer's tensors by name: the SAE's parameters and, with ``adam``, Adam's moments (``W_enc.exp_avg``,
    ``W_enc.exp_avg_sq``, ...) and the dead-latent counters (``tokens_since_fired``)."""
    names = [name for name, _ in sorted(trainer.sae.named_parameters())]
    out = {name: param.detach() for name, param in zip(names, trainer.params, strict=True)}
    if adam:
        state = trainer.optimizer.state_dict()["state"]
        for index, name in enumerate(names):
            out.update({f"{name}.{key}": v for key, v in state.get(index, {}).items() if key != "step"})
        out["tokens_since_fired"] = trainer.tokens_since_fired
    return out


def _restore(trainer: Trainer, tensors: Mapping[str, Tensor], like: Trainer) -> None:
    """Set ``trainer``'s SAE, Adam moments and counters to ``tensors`` (named as by :func:`_run_state`), and its step,
    Adam's steps and hyper-parameters to ``like``'s."""
    trainer.sae.load_state_dict({name: tensors[name] for name in trainer.sae.state_dict()})
    names = [name for name, _ in sorted(trainer.sae.named_parameters())]
    state = like.optimizer.state_dict()
    adam = {
        index: {key: v if key == "step" else tensors[f"{names[index]}.{key}"] for key, v in param_state.items()}
        for index, param_state in state["state"].items()
    }
    trainer.optimizer.load_state_dict({"state": adam, "param_groups": state["param_groups"]})
    trainer.tokens_since_fired = tensors["tokens_since_fired"].to(trainer.tokens_since_fired.device)
    trainer.step = like.step


def current_names(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded ``TrainConfig`` settings (``train_config.json``, a checkpoint's ``trainer.json``) with the fields
    saved under an old name (``source``, ``shard_dir``, ``batch_size``) under their current one."""
    renamed = {old: f.name for f in dataclasses.fields(TrainConfig) for old in f.metadata["old"]}
    return {renamed.get(name, name): value for name, value in settings.items()}


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint a ``resume=True`` run in ``out_dir`` continues from (``out_dir/checkpoint``), or None.

    A checkpoint that a kill left set aside while it was being replaced is put back first
    (:func:`mechscope.files.recover_dir`).
    """
    return recover_dir(Path(out_dir) / CHECKPOINT_DIR)


# ---- the run -------------------------------------------------------------------------------------------------


def _make_store(config: TrainConfig, model: HookedModel | None, device: str) -> BatchSource:
    if model is None:
        model = HookedModel.from_pretrained(config.model, device=device)
    store = ActivationStore(
        model,
        [config.hook_name],
        config.corpus,
        context_length=config.context_length,
        batch_contexts=config.batch_contexts,
        activations_dir=config.activations_dir,
    )
    if config.activations_dir is not None:  # under torchrun every rank harvests its share of the shards
        store.harvest(config.n_tokens, progress=config.progress, data_parallel=True)
    return store


def _batches(config: TrainConfig, store: BatchSource, device: str) -> Iterator[Tensor]:
    """Full ``[batch_size_tokens, d_in]`` batches of the hook's activations, on the SAE's device and dtype."""
    dtype = DTYPES[config.dtype]
    for batch in store.batches(config.batch_size_tokens, config.n_tokens, config.shuffle_buffer, config.seed):
        if config.hook_name not in batch:
            raise KeyError(
                f"the activation store has no {config.hook_name!r} (it has {[k for k in batch if k != 'tokens']}): "
                "build it with this hook_name or set TrainConfig.hook_name to one of those"
            )
        x = batch[config.hook_name]
        if len(x) == config.batch_size_tokens:
            yield x.to(device, dtype)


def _find_checkpoint_once(config: TrainConfig) -> bool:
    """Whether ``out_dir`` holds a checkpoint to resume, checked against ``resume``: rank 0 cleans ``out_dir`` of
    what killed runs left and recovers a set-aside checkpoint, then tells the other ranks."""
    out_dir = Path(config.out_dir)
    found = False
    if distributed.is_main():
        clean_directory(out_dir)  # what killed runs left (temporary files, an interrupted checkpoint swap)
        found = find_checkpoint(out_dir) is not None
    found = distributed.broadcast(found)
    if found and not config.resume:
        raise FileExistsError(
            f"{out_dir} already holds a training checkpoint: pass resume=True (--resume) to continue it, "
            "or choose another out_dir"
        )
    if config.resume and not found:
        raise FileNotFoundError(
            f"resume=True but {out_dir / CHECKPOINT_DIR} does not exist: train without --resume first"
        )
    return found


def train_sae(
    config: TrainConfig,
    model: HookedModel | None = None,
    store: BatchSource | None = None,
    *,
    stop_after: int | None = None,
    write_file: WriteFile = atomic_write,
) -> SparseAutoencoder:
    """Train an SAE on ``config.hook_name`` activations; returns it (in eval mode) and writes ``config.out_dir``.

    Data: ``store`` (an ``ActivationStore`` or any object with its ``batches`` method) when given; otherwise an
    ``ActivationStore`` over ``model`` (a ``HookedModel``; loaded from ``config.model`` when None), which first
    harvests to ``config.activations_dir`` when that is set (under torchrun each rank its share of the shards) and
    otherwise streams live from the model. ``out_dir``
    (and ``activations_dir``) are checked first: a file, or a directory that cannot be written, is refused before
    any model loads. ``stop_after``
    ends the run after that many steps in total (with a checkpoint), keeping the schedule of the full run, so a
    later ``resume=True`` run continues exactly where it stopped. A checkpoint is written every
    ``checkpoint_every`` steps and ``checkpoint_seconds`` seconds, and on Ctrl-C / SIGTERM after the step under way,
    which then raises :class:`~mechscope.interrupts.Interrupted` (the command line prints how to resume).
    ``write_file(path, write)`` writes each file of the
    checkpoints, of the saved SAE and ``train_config.json``: :func:`mechscope.files.atomic_write` (``write(tmp)``,
    then a rename to ``path``) by default; the tests pass one that fails half-way, as a kill would.

    Under torchrun (inside :func:`mechscope.distributed.session`) every rank calls it with the same settings and
    data: each computes its share of every batch (:meth:`Trainer.train_step`), so the ranks train the SAE one
    process trains; rank 0 alone writes ``out_dir``, and a stop signal to any rank stops every rank after the same
    step, with one checkpoint. Every rank returns the SAE; with ``shard_latents`` (:class:`ShardedTrainer`) rank 0
    returns the whole SAE, put together on the CPU, and every other rank its own block of the latents.
    """
    check_output_dir(config.out_dir, "out_dir")
    if config.activations_dir is not None:
        check_output_dir(config.activations_dir, "activations_dir")
    if config.batch_size_tokens < distributed.world_size():
        raise fail(
            config,
            "batch_size_tokens",
            f"is {config.batch_size_tokens}, fewer rows than the {distributed.world_size()} ranks sharing each batch: "
            "raise batch_size_tokens or run fewer processes",
        )
    main = distributed.is_main()
    out_dir = Path(config.out_dir)
    checkpoint = out_dir / CHECKPOINT_DIR
    _find_checkpoint_once(config)
    device = str(distributed.local_device(config.device))
    if store is None:
        store = _make_store(config, model, device)
    batches = _batches(config, store, device)
    first = next(batches, None)
    if first is None:
        raise ValueError(
            f"the activation store yielded no full batch of {config.batch_size_tokens} rows: lower batch_size_tokens"
        )
    torch.manual_seed(config.seed)
    d_in = first.shape[-1]
    k = config.k
    if config.architecture == "topk":
        assert k is not None  # TrainConfig checks that it is a whole number
        k = int(k)
    d_sae = config.expansion_factor * d_in if config.d_sae is None else config.d_sae
    if k is not None and k > d_sae:
        raise fail(
            config,
            "k",
            f"is {k}, more than the SAE's {d_sae} latents (expansion_factor {config.expansion_factor} * d_in {d_in}): "
            "lower k, or raise expansion_factor or d_sae",
        )
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=config.architecture,
        k=k,
        model_name=config.model,
        hook_name=config.hook_name,
        dtype=config.dtype,
        device=device,
    )
    if config.shard_latents:
        trainer: Trainer = ShardedTrainer(config, sae_cfg)
    else:
        trainer = Trainer(config, SparseAutoencoder(sae_cfg).train())
    sae = trainer.sae
    if config.resume:
        trainer.load_checkpoint(checkpoint)
        batches = islice(_chain_first(first, batches), trainer.step, None)
    else:
        with torch.no_grad():  # every rank has the whole first batch
            sae.b_dec.copy_(geometric_median(first).to(sae.b_dec.dtype))
            if config.architecture == "jumprelu":
                sae.threshold.fill_(config.jumprelu_init_threshold)
        batches = _chain_first(first, batches)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps(dataclasses.asdict(config), indent=1)
        write_file(out_dir / TRAIN_CONFIG_FILE, lambda tmp: tmp.write_text(config_json))
        _truncate_metrics(out_dir / METRICS_FILE, trainer.step)

    last = config.n_steps if stop_after is None else min(stop_after, config.n_steps)
    bar = tqdm(total=last, initial=trainer.step, unit="step", desc="train sae", disable=not config.progress or not main)
    by_time = Cadence(seconds=config.checkpoint_seconds)
    with stop_on_signals() as stop:  # Ctrl-C / SIGTERM: finish the step, write a checkpoint, raise Interrupted
        try:
            with open(out_dir / METRICS_FILE, "a") if main else nullcontext() as log:
                for x in batches:
                    if trainer.step >= last:
                        break
                    metrics = trainer.train_step(x)
                    bar.update(1)
                    if log is not None and (trainer.step % config.log_every == 0 or trainer.step == config.n_steps):
                        log.write(json.dumps(metrics) + "\n")
                        log.flush()
                        bar.set_postfix(
                            l0=f"{metrics['l0']:.1f}", fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead']:.1%}"
                        )
                    if trainer.step >= last:
                        continue  # the last checkpoint is written below
                    # any rank's signal or clock stops or checkpoints every rank after this same step
                    flags = distributed.all_reduce_max(torch.tensor([stop.signum or 0, int(by_time())]))
                    signum, due = int(flags[0]), bool(flags[1])
                    every = config.checkpoint_every and trainer.step % config.checkpoint_every == 0
                    if due or every or signum:
                        trainer.save_checkpoint(checkpoint, write_file)
                        by_time.restart()
                    if signum:
                        raise stop.interrupted(
                            "sae train", checkpoint, f"step {trainer.step} of {config.n_steps}", signum, resume=True
                        )
        finally:
            bar.close()
        if trainer.step < last and main:
            warnings.warn(
                f"the activations ran out after {trainer.step} of {last} steps "
                f"({trainer.step * config.batch_size_tokens} tokens): lower n_tokens, or use a larger corpus",
                stacklevel=2,
            )
        trainer.save_checkpoint(checkpoint, write_file)
        whole = trainer.whole_sae()
        if whole is not None and main and (trainer.step >= config.n_steps or stop_after is None):
            whole.save(out_dir / SAE_DIR, overwrite=True, write_file=write_file)
        distributed.barrier()  # every rank returns once the SAE is on disk
    return (sae if whole is None else whole).eval()


def _chain_first(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps up to ``step`` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
