"""Latent-sharded TopK SAEs: each rank holds a contiguous block of the ``d_sae`` latents, and the ranks select each
token's ``k`` latents together (``TrainConfig.shard_latents``, docs/distributed.md).

Rank ``r`` of ``N`` holds the latents ``[lo, hi)`` of :func:`mechscope.distributed.block`: ``W_enc[:, lo:hi]``,
``b_enc[lo:hi]``, ``W_dec[lo:hi]``, and ``b_dec`` whole (replicated), as a :class:`SparseAutoencoder` of ``hi - lo``
latents (its ``k``: the candidates it offers each token, ``min(k, hi - lo)``). Every rank has the whole batch
``x [batch, d_in]``. One TopK pass (:meth:`LatentShard.losses`)::

    pre_acts  = encoder_input(x) @ W_enc[:, lo:hi] + b_enc[lo:hi]          # [batch, hi - lo], this rank's
    candidates: each token's k largest of them, all_gather'ed              # [batch, sum over ranks of min(k, hi - lo)]
    indices   = each token's k largest candidates                         # [batch, k], global, the same on every rank
    recon     = sum over ranks of (the owned selected latents @ W_dec[lo:hi]) + b_dec       # sum_over_ranks
    mse       = ||x - recon||^2 / batch, the same on every rank, as AuxK's over the dead latents

The sum's gradient is the incoming one (:func:`~mechscope.distributed.sum_over_ranks`): every rank computes the same
loss from it, so each rank's backward pass gives its own latents' gradients, those of the one-process SAE. ``b_dec``
enters each rank's encoder too; its gradient there is summed over the ranks
(:func:`~mechscope.distributed.sum_gradient_over_ranks`, ``d_in`` values), so it ends equal on every rank. Nothing
else is exchanged in the backward pass: no gradient all-reduce, and Adam, the decoder's normalisation and the
dead-latent counters are per latent, so each rank's own.

:meth:`LatentShard.take` cuts a rank's block out of the whole SAE's tensors, :meth:`LatentShard.gather` puts the
ranks' blocks together on rank 0 (checkpoints and the saved SAE are the one-process files).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

import mechscope.distributed as distributed
from mechscope.sae.config import SAEConfig
from mechscope.sae.kernels import SelectedPreActs, SparseDecode, top_indices
from mechscope.sae.latents import SparseLatents
from mechscope.sae.model import SparseAutoencoder

# The axis along which a tensor is indexed by latent, by the first part of its name (None: replicated).
LATENT_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "b_dec": None, "tokens_since_fired": 0}


class LatentShard:
    """This rank's block of the latents of a TopK SAE of config ``cfg`` (the whole SAE's), ``latents``."""

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.architecture != "topk":
            raise ValueError(f"latent sharding is for topk SAEs, not {cfg.architecture!r}")
        if cfg.d_sae < distributed.world_size():
            raise ValueError(
                f"d_sae={cfg.d_sae} latents cannot be split over {distributed.world_size()} ranks, fewer than one "
                "each: run fewer processes, or raise d_sae"
            )
        self.cfg = cfg
        self.latents = distributed.block(cfg.d_sae)

    @property
    def k(self) -> int:
        """The latents each token selects from the whole SAE."""
        k = self.cfg.k
        assert isinstance(k, int), "a topk SAE's k is an int"
        return k

    def local_cfg(self) -> SAEConfig:
        """The config of this rank's SAE: ``hi - lo`` latents, ``k`` the candidates it offers each token."""
        return replace(self.cfg, d_sae=len(self.latents), k=min(self.k, len(self.latents)))

    def local_sae(self, whole: SparseAutoencoder, device: str | torch.device) -> SparseAutoencoder:
        """This rank's block of ``whole`` (an SAE of :attr:`cfg`) as a new SAE on ``device``, in training mode."""
        return SparseAutoencoder.from_tensors(self.local_cfg(), self.take(whole.state_dict())).to(device).train()

    # ---- the forward pass --------------------------------------------------------------------------------------

    def top(self, products: Tensor, k: int, bias: Tensor, among: Tensor | None = None) -> Tensor:
        """``[batch, k]``: the global indices of each token's ``k`` largest pre-activations of the whole SAE (only
        among its latents where ``among`` is True, when given), of which ``products + bias`` (``products [batch,
        hi - lo]``, the encoder's product without ``b_enc``) are this rank's; the same on every rank.

        Each rank offers its ``min(k, hi - lo)`` largest (the token's ``k`` largest are among the ranks' offers);
        their values and indices are gathered (:func:`~mechscope.distributed.all_gather`, as ``[offers, batch]``
        so that the ranks' offers may differ in number)."""
        mine = min(k, products.shape[-1] if among is None else int(among.sum()))
        if mine:
            indices = top_indices(products, mine, among, bias)
        else:  # none of this rank's latents may be chosen
            indices = torch.zeros(len(products), 0, dtype=torch.long, device=products.device)
        values = products.gather(-1, indices) + bias[indices]
        offered = torch.cat(distributed.all_gather(values.T.contiguous())).T  # [batch, offers of every rank]
        where = torch.cat(distributed.all_gather((indices + self.latents.start).T.contiguous())).T
        return where.gather(-1, offered.topk(k, dim=-1, sorted=False).indices)

    def check_room(self, aux_k: int) -> None:
        """Raise a ValueError unless every rank's block holds at least ``k`` and ``aux_k`` latents (:meth:`own`)."""
        world = distributed.world_size()
        smallest = len(distributed.block(self.cfg.d_sae, world - 1, world))
        if smallest < max(self.k, aux_k):
            raise ValueError(
                f"latent sharding needs at least max(k, aux_k) = {max(self.k, aux_k)} latents on every rank, but "
                f"d_sae={self.cfg.d_sae} over {world} ranks leaves {smallest}: run fewer processes, raise d_sae, or "
                "lower k or aux_k"
            )

    def own(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Global latent ``indices [batch, s]`` as this rank's: local indices ``[batch, s]``, and which of them are
        this rank's (a boolean ``[batch, s]``).

        Another rank's latent becomes a stand-in, one of the smallest local indices the row's own latents do not
        use, so that each row's local indices are distinct (``SparseDecode``'s backward needs that; the stand-ins'
        values are set to 0). This needs ``s <= hi - lo`` (:meth:`check_room`)."""
        owned = (indices >= self.latents.start) & (indices < self.latents.stop)
        local = indices - self.latents.start
        s = indices.shape[-1]
        used = torch.zeros(len(indices), s + 1, dtype=torch.bool, device=indices.device)  # column s: j >= s, others
        used = used.scatter_(-1, torch.where(owned, local.clamp(max=s), s), True)[:, :s]  # [batch, s]: is j in the row
        free = torch.where(used, s, torch.arange(s, device=indices.device)).sort(dim=-1).values  # unused j first
        nth_other = ((~owned).cumsum(-1) - 1).clamp(min=0)  # each other rank's entry's place among the row's others
        return torch.where(owned, local, free.gather(-1, nth_other)), owned

    def losses(
        self, sae: SparseAutoencoder, x: Tensor, batch_size: int, dead: Tensor, aux_k: int, aux_k_coefficient: float
    ) -> tuple[dict[str, Tensor], SparseLatents, Tensor]:
        """The TopK loss terms of the whole SAE on ``x [batch, d_in]`` (each a sum over the rows divided by
        ``batch_size``; AuxK's over the ``aux_k`` largest dead latents, ``dead`` the boolean ``[hi - lo]`` of this
        rank's), the same on every rank; this rank's selected latents (``[batch, k]``: local indices, and value 0
        where another rank's latent was selected, :meth:`own`); and the reconstruction ``[batch, d_in]``.

        ``sae`` is this rank's block (:meth:`local_sae`). The same terms as ``Trainer._topk_losses`` of the whole SAE:
        the selections are the same, and the gradients each rank's latents get are the whole SAE's."""
        k = self.k
        encoder_input, stats = sae.encoder_input(x)
        if sae.cfg.apply_b_dec_to_input:  # b_dec's gradient through the encoder: every rank's part, not only this one's
            encoder_input = encoder_input - (distributed.sum_gradient_over_ranks(sae.b_dec) - sae.b_dec)  # + 0
        with torch.no_grad():
            products = encoder_input @ sae.W_enc  # [batch, hi - lo], no graph; the pre-activations less b_enc
            indices = self.top(products, k, sae.b_enc)
            n_dead = int(distributed.all_reduce_sum(dead.sum()))
            if n_dead:
                aux = self.top(products, min(aux_k, n_dead), sae.b_enc, among=dead)
                indices = torch.cat([indices, aux], dim=-1)
            owns = [self.own(part) for part in indices.split([k, indices.shape[-1] - k], dim=-1)]
            local, owned = (torch.cat(parts, dim=-1) for parts in zip(*owns, strict=True))
        selected = SelectedPreActs.apply(encoder_input, sae.W_enc, sae.b_enc, local, products).relu()
        selected = selected.masked_fill(~owned, 0.0)
        latents = SparseLatents(local[:, :k], selected[:, :k])
        decoded = distributed.sum_over_ranks(SparseDecode.apply(*latents, sae.W_dec))
        recon = sae.denormalize(decoded + sae.b_dec, stats)
        error = x - recon
        terms = {"mse": error.pow(2).sum() / batch_size}
        if indices.shape[-1] > k:
            aux_recon = distributed.sum_over_ranks(SparseDecode.apply(local[:, k:], selected[:, k:], sae.W_dec))
            terms["aux"] = aux_k_coefficient * (error.detach() - aux_recon).pow(2).sum() / batch_size
        return terms, latents, recon

    # ---- moving state ------------------------------------------------------------------------------------------

    def take(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's block of each of the whole SAE's ``tensors`` (named as in :data:`LATENT_AXIS`, by the part
        before the first dot: ``W_enc.exp_avg`` is cut as ``W_enc``), as new contiguous tensors (a replicated one
        whole)."""
        out = {}
        for name, tensor in tensors.items():
            axis = LATENT_AXIS[name.split(".")[0]]
            own = tensor if axis is None else tensor.narrow(axis, self.latents.start, len(self.latents))
            out[name] = own.clone(memory_format=torch.contiguous_format)
        return out

    def gather(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """On rank 0, the whole SAE's tensors put together from every rank's block ``tensors`` (the same names on
        every rank, as in :meth:`take`; a replicated one is rank 0's), on the CPU; None on the other ranks.

        The blocks travel point to point to rank 0 (:func:`~mechscope.distributed.gather_tensors_to_main`), which
        holds the whole SAE's tensors once (and, while it puts one together, that tensor's blocks too)."""
        names = [name for name in tensors if LATENT_AXIS[name.split(".")[0]] is not None]
        gathered = distributed.gather_tensors_to_main([tensors[name].detach().cpu().flatten() for name in names])
        if gathered is None:
            return None
        world = len(gathered)
        out = {name: tensor.detach().cpu() for name, tensor in tensors.items()}
        for position, name in enumerate(names):
            axis = LATENT_AXIS[name.split(".")[0]]
            assert axis is not None
            pieces = []
            for r in range(world):
                shape = list(tensors[name].shape)
                shape[axis] = len(distributed.block(self.cfg.d_sae, r, world))
                pieces.append(gathered[r][position].view(shape))
                gathered[r][position] = pieces[-1].new_empty(0)  # the block is freed once it is in the whole
            out[name] = torch.cat(pieces, dim=axis)
            del pieces
        return out
