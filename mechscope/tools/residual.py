"""Tool "residual": what the residual stream is made of, how it moves, and which inputs drive a logit.

``residual_decomposition`` splits the residual before a block into the embeddings and every earlier
block's attention and MLP outputs; ``residual_movement`` compares the stream at two layers;
``feature_attribution`` attributes one logit to the input tokens (gradient x input, integrated
gradients) and to the residual components (direct logit attribution). See ``docs/tools/residual.md``.

Layer ``L`` means the residual stream entering block ``L`` (``blocks.L.hook_resid_pre``);
``L = n_layers`` is the final residual (``blocks.{n_layers-1}.hook_resid_post``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mechscope.models.names import EMBED_POINTS, block_hook
from mechscope.models.tokenizer import Input
from mechscope.tools import BaseInterpretabilityTool
from mechscope.tools.inputs import as_tokens

#: logits held at once while integrating gradients (float32 entries: 2**25 is 128 MiB)
_LOGIT_BUDGET = 2**25
#: edges of the integration panels of integrated gradients: graded towards the zero baseline
IG_PANELS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def ig_quadrature(n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α [m]`` and weights ``[m]`` (summing to 1) for ``∫₀¹ g(α) dα ≈ Σ w g(α)``.

    Composite Gauss-Legendre on the panels :data:`IG_PANELS`, ``ceil(n_steps / 5)`` nodes each, so
    ``m`` is ``n_steps`` rounded up to a multiple of 5. The panels shrink geometrically towards
    ``α = 0``: with a zero baseline every normalisation layer sees an input near 0, where it is
    steepest (``x / sqrt(mean(x²) + eps)``), and a path through a model without biases can change over
    ``α ~ 1e-4``; equal-width rules miss that and break completeness, graded panels resolve it.
    """
    per = -(-n_steps // (len(IG_PANELS) - 1))
    x, w = np.polynomial.legendre.leggauss(per)
    edges = np.asarray(IG_PANELS)
    lo, width = edges[:-1, None], np.diff(edges)[:, None]
    return torch.from_numpy((lo + width * (x + 1) / 2).ravel()), torch.from_numpy((width * w / 2).ravel())


class ResidualTools(BaseInterpretabilityTool):
    """Residual-stream decomposition, movement and attribution (tool ``"residual"``)."""

    # ---- helpers -----------------------------------------------------------------------------------
    def _layer(self, layer: int, what: str) -> int:
        n = self.model.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(
                f"{what}={layer!r} is out of range: valid layers are 0..{n} "
                f"({n} = the final residual stream, after the last block)"
            )
        return layer

    def _resid_name(self, layer: int) -> str:
        n = self.model.cfg.n_layers
        return block_hook(layer, "hook_resid_pre") if layer < n else block_hook(n - 1, "hook_resid_post")

    def _component_names(self, layer: int) -> list[str]:
        """Hook names of the embeddings and of the attention and MLP outputs of blocks ``0..layer-1``."""
        embeds = [n for n in EMBED_POINTS if n in self.model.points.names]
        return embeds + [block_hook(i, point) for i in range(layer) for point in ("hook_attn_out", "hook_mlp_out")]

    # ---- decomposition and movement ----------------------------------------------------------------
    def residual_decomposition(self, input_ids: Input, layer_idx: int) -> dict[str, torch.Tensor]:
        """The residual stream before block ``layer_idx`` as named components, each ``[batch, pos, d_model]``.

        Keys in forward order: ``embed`` (``pos_embed`` for learned positions), then ``{i}_attn_out`` and
        ``{i}_mlp_out`` for each block ``i < layer_idx``. Their sum is ``blocks.{layer_idx}.hook_resid_pre``
        (``layer_idx = n_layers``: the final residual) up to float rounding. Later blocks are not run.
        """
        layer = self._layer(layer_idx, "layer_idx")
        names = self._component_names(layer)
        _, cache = self.model.run_with_cache(
            as_tokens(self.model, input_ids), names_filter=names, stop_at_layer=self.model.stop_layer_for(names)
        )
        parts, labels = cache.decompose_resid(layer, return_labels=True)
        return dict(zip(labels, parts, strict=True))

    def residual_movement(self, input_ids: Input, layer_idx1: int, layer_idx2: int) -> dict[str, torch.Tensor]:
        """How the residual stream ``r1`` at ``layer_idx1`` became ``r2`` at ``layer_idx2``, per position.

        Every value is ``[batch, pos]``: ``norm1 = |r1|``, ``norm2 = |r2|``, ``norm_change = |r2| - |r1|``,
        ``relative_change = |r2 - r1| / |r1|`` and ``cosine = r1·r2 / (|r1| |r2|)``.
        """
        l1, l2 = self._layer(layer_idx1, "layer_idx1"), self._layer(layer_idx2, "layer_idx2")
        n1, n2 = self._resid_name(l1), self._resid_name(l2)
        stop = self.model.stop_layer_for([n1, n2])
        _, cache = self.model.run_with_cache(
            as_tokens(self.model, input_ids), names_filter=[n1, n2], stop_at_layer=stop
        )
        r1, r2 = cache[n1].float(), cache[n2].float()
        norm1, norm2 = r1.norm(dim=-1), r2.norm(dim=-1)
        return {
            "norm1": norm1,
            "norm2": norm2,
            "norm_change": norm2 - norm1,
            "relative_change": (r2 - r1).norm(dim=-1) / norm1,
            "cosine": F.cosine_similarity(r1, r2, dim=-1),
        }

    # ---- attribution -------------------------------------------------------------------------------
    def _unembed(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [batch, d_model], bias [batch])`` with ``logit = normalized · u + bias`` (before any soft-cap).

        ``normalized`` is the final norm's input centred (LayerNorm) and divided by its scale; ``u`` is the
        norm's gain ``ln_final_w`` times the target's unembedding column, ``bias`` the norm's bias through
        the unembedding plus the unembedding bias.
        """
        m = self.model
        w_u = m.W_U[:, targets].T.float()
        return m.ln_final_w.float() * w_u, w_u @ m.ln_final_b.float() + m.b_U[targets].float()

    def _path_gradients(
        self,
        tokens: torch.Tensor,
        embed: torch.Tensor,
        alphas: torch.Tensor,
        targets: torch.Tensor,
        position: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The target logit ``[steps, batch]`` at token embeddings ``α·embed``, and ``(∂logit/∂x · embed)``
        summed over ``d_model`` at ``x = α·embed``, ``[steps, batch, pos]``, for each α of ``alphas [steps]``."""
        batch, pos = tokens.shape
        per_chunk = max(1, _LOGIT_BUDGET // (batch * pos * self.model.cfg.d_vocab))
        chunks = list(alphas.split(per_chunk))
        logits_out, attr_out = [], []
        for a in tqdm(chunks, desc="integrated gradients", disable=len(chunks) < 2, leave=False):
            x = (a.to(embed.dtype)[:, None, None, None] * embed).reshape(-1, *embed.shape[1:]).requires_grad_()
            rows = torch.arange(x.shape[0], device=x.device)
            with torch.enable_grad():
                replace = [("hook_embed", lambda t, h, x=x: x)]
                logits = self.model.run_with_hooks(tokens.repeat(len(a), 1), fwd_hooks=replace)
                chosen = logits[rows, position, targets.repeat(len(a))]
                (grad,) = torch.autograd.grad(chosen.sum(), x)
            logits_out.append(chosen.detach().float().reshape(len(a), batch))
            attr_out.append((grad.float().reshape(len(a), *embed.shape) * embed.float()).sum(-1))
        return torch.cat(logits_out), torch.cat(attr_out)

    def feature_attribution(
        self,
        input_ids: Input,
        target_ids: int | torch.Tensor,
        position: int = -1,
        n_steps: int = 50,
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """Attribute the logit of ``target_ids`` at ``position`` to the input tokens and to the residual components.

        ``target_ids`` is one token id, or one per sequence ``[batch]``. Returns (``[batch]`` unless noted):

        - ``logit``: the model's logit ``f(e)`` of the target at ``position``, ``e`` the token embeddings
          (``hook_embed``; learned positions are left as they are);
        - ``grad_x_input [batch, pos]``: ``Σ_d e · ∂f/∂e`` at each input position;
        - ``integrated_gradients [batch, pos]``: ``Σ_d e · ∫₀¹ ∂f/∂e(α e) dα`` with a zero baseline, the
          integral by composite Gauss-Legendre quadrature with about ``n_steps`` nodes, graded towards
          the baseline (:func:`ig_quadrature`);
        - ``baseline_logit``: ``f(0)``; ``ig_completeness_error``: ``Σ_pos IG - (f(e) - f(0))``, which
          completeness says is 0 (it measures the quadrature error);
        - ``direct_logit_attribution``: ``{component: [batch]}`` for ``embed`` (``pos_embed``),
          ``{i}_attn_out``, ``{i}_mlp_out`` and ``bias``. Each component ``c`` of the final residual at
          ``position`` goes through the final norm as TransformerLens does: centred (LayerNorm) and divided
          by the final norm's cached scale ``ln_final.hook_scale`` of the whole residual, so the norm is
          frozen and linear; then times the norm's gain and the target's unembedding row. ``bias`` is the
          norm's bias and the unembedding bias. The entries sum to the logit (before Gemma 2's final
          soft-cap, where the model has one).
        """
        tokens = as_tokens(self.model, input_ids)
        batch, pos = tokens.shape
        if not -pos <= position < pos:
            raise ValueError(f"position={position} is out of range for sequences of {pos} tokens")
        position %= pos
        targets = torch.as_tensor(target_ids, device=tokens.device).reshape(-1).long()
        if targets.numel() == 1:
            targets = targets.expand(batch)
        if targets.shape != (batch,) or not bool(((targets >= 0) & (targets < self.model.cfg.d_vocab)).all()):
            raise ValueError(
                f"target_ids must be one token id or one per sequence ({batch}), "
                f"each in 0..{self.model.cfg.d_vocab - 1}"
            )
        if n_steps < 1:
            raise ValueError(f"n_steps must be at least 1, got {n_steps}")
        n = self.model.cfg.n_layers
        rows = torch.arange(batch, device=tokens.device)
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(
                tokens, names_filter=[*self._component_names(n), "ln_final.hook_scale"]
            )
            logit = logits[rows, position, targets].float()
            parts, labels = cache.decompose_resid(n, apply_ln=True, return_labels=True)
            u, bias = self._unembed(targets)
            dla = (parts[:, rows, position].float() * u).sum(-1)

        nodes, weights = ig_quadrature(n_steps)
        alphas = torch.cat([torch.tensor([1.0, 0.0], dtype=nodes.dtype), nodes]).to(tokens.device)
        path_logits, path_attr = self._path_gradients(tokens, cache["hook_embed"], alphas, targets, position)
        ig = torch.einsum("s,sbp->bp", weights.to(path_attr), path_attr[2:])
        baseline = path_logits[1]
        return {
            "logit": logit,
            "baseline_logit": baseline,
            "grad_x_input": path_attr[0],
            "integrated_gradients": ig,
            "ig_completeness_error": ig.sum(-1) - (logit - baseline),
            "direct_logit_attribution": {**dict(zip(labels, dla, strict=True)), "bias": bias},
        }
