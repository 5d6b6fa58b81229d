"""Tool "composition": Q-, K- and V-composition scores between attention heads (Elhage et al. 2021).

With TransformerLens's definitions (``HookedTransformer.all_composition_scores``), for an earlier head
``(l1, h1)`` and a later head ``(l2, h2)``, ``l1 < l2``:

    score = ||OV[l1, h1] @ R[l2, h2]||_F / (||OV[l1, h1]||_F ||R[l2, h2]||_F)

with ``R = QK`` (Q-composition: the earlier head writes into what the later head's queries read),
``R = QK^T`` (K-composition: into its keys), ``R = OV`` (V-composition: into its values). ``OV = W_V W_O``
and ``QK = W_Q W_K^T`` are ``[d_model, d_model]``; every norm is computed from ``[d_head, d_head]`` cores
(thin QR factors), never from a ``d_model x d_model`` product. See ``docs/tools/composition.md``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mechscope.tools import BaseInterpretabilityTool

MODES = ("Q", "K", "V")


def _r(x: torch.Tensor) -> torch.Tensor:
    """The ``R`` factor ``[..., d_head, d_head]`` of the reduced QR of ``x [..., d_model, d_head]``:
    ``||M x^T||_F = ||M R^T||_F`` for any ``M``, since ``x = Q R`` with orthonormal columns in ``Q``."""
    return torch.linalg.qr(x.double()).R


class CompositionScores(BaseInterpretabilityTool):
    """Q-, K- and V-composition scores between heads of different layers (tool ``"composition"``)."""

    def _factors(self, mode: str, fold_ln: bool) -> tuple[torch.Tensor, ...]:
        """``(W_V, W_O, X, Y^T)`` in float64, with the later head's circuit ``R = X @ Y``; each is
        ``[n_layers, n_heads, d_model, d_head]`` except ``W_O [n_layers, n_heads, d_head, d_model]``."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use 'Q', 'K' or 'V'")
        m = self.model
        with torch.no_grad():
            scale = m.ln1_w.double()[:, None, :, None] if fold_ln else 1.0
            w_q, w_k, w_v = (scale * w.double() for w in (m.W_Q, m.W_K, m.W_V))
            w_o = m.W_O.double()
        x, y_t = {"Q": (w_q, w_k), "K": (w_k, w_q), "V": (w_v, w_o.mT)}[mode]
        return w_v, w_o, x, y_t

    def composition_scores(self, mode: str, fold_ln: bool = False) -> torch.Tensor:
        """``[n_layers, n_heads, n_layers, n_heads]`` composition scores of ``mode`` ``"Q"``, ``"K"`` or ``"V"``.

        Entry ``[l1, h1, l2, h2]`` scores the earlier head ``(l1, h1)`` writing into the later head
        ``(l2, h2)``; it is filled only for ``l1 < l2`` and is 0 elsewhere (as in TransformerLens). Scores
        lie in ``[0, 1]``; a pair where either circuit is the zero matrix has no defined score and gets NaN.
        ``fold_ln=True`` multiplies the ln1 weight into ``W_Q``, ``W_K``, ``W_V`` first, as TransformerLens's
        ``fold_ln`` does. float32 result.
        """
        if not isinstance(fold_ln, bool):
            raise TypeError(f"fold_ln must be True or False, got {fold_ln!r}")
        w_v, w_o, x, y_t = self._factors(mode, fold_ln)
        n_layers, n_heads = w_v.shape[:2]
        r_v, r_y = _r(w_v), _r(y_t)  # [L, H, d_head, d_head]
        left_norm = torch.linalg.matrix_norm(r_v @ w_o)  # ||W_V W_O||_F
        right_norm = torch.linalg.matrix_norm(_r(x) @ r_y.mT)  # ||X Y||_F
        scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=torch.float64)
        for l1 in tqdm(range(n_layers - 1), desc=f"{mode}-composition", disable=n_layers < 8, leave=False):
            # ||W_V W_O X Y|| = ||R_V (W_O X) R_Y^T||: [h1, l2, h2, d_head, d_head] cores
            core = r_v[l1, :, None, None] @ (w_o[l1, :, None, None] @ x[None, l1 + 1 :]) @ r_y[None, l1 + 1 :].mT
            norms = torch.linalg.matrix_norm(core)
            scores[l1, :, l1 + 1 :] = norms / (left_norm[l1, :, None, None] * right_norm[None, l1 + 1 :])
        return scores.float()
