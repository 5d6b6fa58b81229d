"""Tool "superposition": principal and independent directions of a hook point's activations.

The covariance of an activation over every token of a corpus, its top principal components (PCA), or
independent directions found by FastICA; projecting activations on a set of directions, reconstructing
them, and interpolating between two directions. See ``docs/tools/superposition.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mechscope.models.names import is_attention_map
from mechscope.models.tokenizer import Input, tokenize
from mechscope.tools import BaseInterpretabilityTool


@dataclass
class ICAResult:
    """What :func:`fast_ica` finds in data ``x [n, d]``: ``x ≈ mean + sources @ mixing.T``.

    ``sources [n, k]`` have zero mean and unit variance; ``mixing [d, k]`` holds the direction (and size)
    each source writes along; ``unmixing [k, d]`` gives ``sources = (x - mean) @ unmixing.T``. Sources are
    ordered by the variance they contribute, ``|mixing[:, i]|²``; ``explained_variance_ratio [k]`` is that
    over the total variance of ``x``. ``converged`` says whether FastICA met ``tol`` within ``max_iter``.
    """

    sources: torch.Tensor
    mixing: torch.Tensor
    unmixing: torch.Tensor
    mean: torch.Tensor
    explained_variance_ratio: torch.Tensor
    n_iter: int
    converged: bool


def _fix_signs(columns: torch.Tensor) -> torch.Tensor:
    """``[k]`` of ±1 making each column's largest-magnitude entry positive (a deterministic sign choice)."""
    idx = columns.abs().argmax(0)
    signs = torch.sign(columns[idx, torch.arange(columns.shape[1])])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _top_eigen(cov: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues ``[k]`` (descending) and eigenvectors ``[d, k]`` of a symmetric matrix."""
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    return evals, evecs * _fix_signs(evecs)


def principal_components(cov: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top principal directions of a covariance ``[d, d]``: ``(components [d, k], explained_variance_ratio [k])``.

    Columns are unit-norm eigenvectors ordered by eigenvalue (variance explained), each with its
    largest-magnitude entry positive; the ratio of component ``i`` is ``λ_i / trace(cov)``.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(
            f"method='pca' takes a covariance matrix [d, d], got shape {tuple(cov.shape)}; pass the output of "
            "compute_activation_covariance, or use method='ica' with activations from collect_activations"
        )
    c = cov.double()
    if not torch.allclose(c, c.T, rtol=1e-5, atol=1e-8 * float(c.abs().max())):
        raise ValueError("method='pca' takes a symmetric covariance matrix; this matrix is not symmetric")
    _check_n(n_components, c.shape[0], "the feature dimension d")
    evals, evecs = _top_eigen(c, n_components)
    return evecs.to(_out_dtype(cov)), (evals / torch.trace(c)).to(_out_dtype(cov))


def _sym_decorrelate(w: torch.Tensor) -> torch.Tensor:
    """``(W Wᵀ)^(-1/2) W``: the nearest matrix with orthonormal rows."""
    s, u = torch.linalg.eigh(w @ w.T)
    return (u * s.clamp_min(1e-30).rsqrt()) @ u.T @ w


def fast_ica(
    x: torch.Tensor,
    n_components: int,
    seed: int = 0,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> ICAResult:
    """FastICA (Hyvärinen 1999), symmetric version with the log-cosh contrast, in float64.

    ``x [..., d]`` is flattened to samples ``[n, d]``, centred and whitened onto its top ``n_components``
    principal directions (``z = (x - mean) E Λ^(-1/2)``, unit covariance). Then, with ``g = tanh``, every
    row ``w`` of an orthogonal ``W [k, k]`` is updated as ``w ← E[z g(wᵀz)] - E[g'(wᵀz)] w`` and ``W`` is
    re-orthonormalised (``W ← (W Wᵀ)^(-1/2) W``) until ``max |diag(W_new W_oldᵀ)| - 1 < tol``.
    Independent non-Gaussian sources mixed linearly are recovered up to sign, order and scale; here
    the order is by contributed variance and each mixing column's largest entry is positive.
    """
    x = x.reshape(-1, x.shape[-1]).double()
    n, d = x.shape
    _check_n(n_components, min(n - 1, d), "min(n_samples - 1, d)")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)
    evals, evecs = _top_eigen(cov, n_components)
    if evals[-1] <= 1e-12 * evals[0]:
        raise ValueError(
            f"the activations span fewer than n_components={n_components} dimensions; ask for fewer components"
        )
    z = xc @ (evecs / evals.sqrt())
    g = torch.Generator().manual_seed(seed)
    w = torch.linalg.qr(torch.randn(n_components, n_components, generator=g, dtype=torch.float64))[0]
    converged, n_iter = False, 0
    while not converged and n_iter < max_iter:
        n_iter += 1
        gy = torch.tanh(z @ w.T)
        w_new = _sym_decorrelate(gy.T @ z / n - (1 - gy**2).mean(0)[:, None] * w)
        lim = float(((w_new * w).sum(1).abs() - 1).abs().max())
        w, converged = w_new, lim < tol
    if not converged:
        warnings.warn(f"FastICA did not converge in {max_iter} iterations; raise max_iter or tol", stacklevel=2)
    mixing = (evecs * evals.sqrt()) @ w.T  # [d, k]: x - mean ≈ sources @ mixing.T
    unmixing = w @ (evecs / evals.sqrt()).T  # [k, d]
    order = mixing.pow(2).sum(0).argsort(descending=True)
    mixing, unmixing = mixing[:, order], unmixing[order]
    signs = _fix_signs(mixing)
    mixing, unmixing = mixing * signs, unmixing * signs[:, None]
    return ICAResult(
        sources=xc @ unmixing.T,
        mixing=mixing,
        unmixing=unmixing,
        mean=mean,
        explained_variance_ratio=mixing.pow(2).sum(0) / torch.trace(cov),
        n_iter=n_iter,
        converged=converged,
    )


def _check_n(n: int, limit: int, what: str) -> None:
    if not 1 <= n <= limit:
        raise ValueError(f"n_concepts={n} is out of range: it must be between 1 and {what} = {limit}")


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


class SuperpositionDisentangler(BaseInterpretabilityTool):
    """Principal and independent directions of one hook point's activations (tool ``"superposition"``)."""

    # ---- activations ------------------------------------------------------------------------------
    def _activations(self, ids_list: Input | Sequence[Input], layer: str, desc: str) -> Iterator[torch.Tensor]:
        """``[n_tokens, features]`` per element of ``ids_list`` (padding dropped), running only the blocks needed."""
        if not isinstance(layer, str):
            raise TypeError(f"layer is one hook name such as 'blocks.0.hook_resid_post', got {type(layer).__name__}")
        self.model.points.resolve(layer)  # unknown names and layers out of range raise here, naming the fix
        if is_attention_map(layer):
            raise ValueError(
                f"hook point {layer} is [batch, head, q_pos, k_pos], not a per-token activation [batch, pos, ...]; "
                "pick a per-token activation such as blocks.0.hook_resid_post or blocks.0.attn.hook_z"
            )
        items = [ids_list] if isinstance(ids_list, torch.Tensor | str) else list(ids_list)
        if not items:
            raise ValueError("ids_list is empty: give a list of token tensors or texts")
        stop = self.model.stop_layer_for([layer])
        for item in tqdm(items, desc=desc, disable=len(items) < 2, leave=False):
            tokens, mask = tokenize(self.model.tokenizer, item)
            _, cache = self.model.run_with_cache(tokens, names_filter=layer, stop_at_layer=stop, attention_mask=mask)
            act = cache[layer]
            if act.shape[:2] != tokens.shape:
                raise ValueError(
                    f"hook point {layer} has shape {tuple(act.shape)}, not [batch, pos, ...] like the tokens "
                    f"{tuple(tokens.shape)}; pick a per-token activation such as blocks.0.hook_resid_post"
                )
            act = act.reshape(*tokens.shape, -1)
            yield act[mask.bool()] if mask is not None else act.reshape(-1, act.shape[-1])

    def collect_activations(self, ids_list: Input | Sequence[Input], layer: str) -> torch.Tensor:
        """``[n_tokens, d]``: hook point ``layer``'s activation at every token of every sequence.

        ``ids_list`` is a list of token tensors (``[pos]`` or ``[batch, pos]``) or texts; padding of a
        ragged text batch is left out. Trailing dimensions (e.g. ``[head, d_head]`` of ``hook_z``) are
        flattened into ``d``. Feed this to ``disentangle_superposition(..., method="ica")``.
        """
        return torch.cat(list(self._activations(ids_list, layer, "activations")))

    def compute_activation_covariance(self, ids_list: Input | Sequence[Input], layer: str) -> torch.Tensor:
        """``[d, d]``: the sample covariance (``n - 1`` denominator) of ``layer``'s features over every token.

        ``layer`` is one hook name, canonical (``blocks.0.hook_resid_post``) or a module point
        (``layers.0.self_attn.hook_result_post``); blocks after it are not run. Sequences are streamed:
        per-sequence means and centred scatter matrices are merged exactly (Chan et al.), in float64.
        """
        n, dtype = 0, torch.float32
        mean: torch.Tensor | None = None  # [d]
        m2: torch.Tensor | None = None  # [d, d]: the centred scatter matrix
        for x in self._activations(ids_list, layer, "covariance"):
            dtype, x = _out_dtype(x), x.double()
            nb, mb = x.shape[0], x.mean(0)
            xc = x - mb
            if mean is None or m2 is None:
                n, mean, m2 = nb, mb, xc.T @ xc
                continue
            delta, total = mb - mean, n + nb
            m2 = m2 + xc.T @ xc + torch.outer(delta, delta) * (n * nb / total)
            mean = mean + delta * (nb / total)
            n = total
        if n < 2 or m2 is None:
            raise ValueError("a covariance needs at least two tokens; give longer or more sequences")
        return (m2 / (n - 1)).to(dtype)

    # ---- directions -------------------------------------------------------------------------------
    def disentangle_superposition(
        self,
        matrix: torch.Tensor,
        n_concepts: int = 10,
        method: str = "pca",
        return_ratios: bool = False,
        seed: int = 0,
        max_iter: int = 500,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Concept directions ``[d, n_concepts]``, unit norm, ordered by variance explained.

        ``method="pca"``: ``matrix`` is a covariance ``[d, d]`` (from :meth:`compute_activation_covariance`);
        the directions are its top eigenvectors and the ratios ``λ_i / trace(cov)``.
        ``method="ica"``: ``matrix`` is activations ``[n, d]`` (from :meth:`collect_activations`); the
        directions are the normalised mixing columns of :func:`fast_ica` on the top ``n_concepts``
        principal dimensions, and the ratios each source's variance ``|mixing_i|²`` over the total.
        With ``return_ratios=True`` returns ``(directions, explained_variance_ratio [n_concepts])``.
        """
        if method == "pca":
            directions, ratios = principal_components(matrix, n_concepts)
        elif method == "ica":
            if matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] and torch.equal(matrix, matrix.T):
                warnings.warn(
                    "method='ica' takes activations [n, d], and this looks like a covariance matrix; "
                    "use collect_activations(ids_list, layer)",
                    stacklevel=2,
                )
            res = fast_ica(matrix, n_concepts, seed=seed, max_iter=max_iter)
            dtype = _out_dtype(matrix)
            directions = (res.mixing / res.mixing.norm(dim=0)).to(dtype)
            ratios = res.explained_variance_ratio.to(dtype)
        else:
            raise ValueError(f"method must be 'pca' or 'ica', got {method!r}")
        return (directions, ratios) if return_ratios else directions

    @staticmethod
    def project_activations(activations: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """Coefficients ``[..., k]`` of ``activations [..., d]`` on ``concepts [d, k]``.

        The least-squares coefficients ``c`` minimising ``|x - concepts c|``, i.e. ``x @ pinv(concepts).T``;
        for orthonormal concepts (PCA) this is simply ``x @ concepts``. Not centred.
        """
        if concepts.ndim != 2 or activations.shape[-1] != concepts.shape[0]:
            raise ValueError(
                f"activations [..., {activations.shape[-1]}] and concepts {tuple(concepts.shape)} do not fit: "
                "concepts must be [d, n_concepts] with d the activations' last dimension"
            )
        return activations @ torch.linalg.pinv(concepts.to(activations.dtype)).T

    @staticmethod
    def reconstruct_activations(projections: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """``[..., d]``: ``projections [..., k] @ concepts.T``, the activation the coefficients stand for."""
        if projections.shape[-1] != concepts.shape[1]:
            raise ValueError(
                f"projections have {projections.shape[-1]} coefficients but there are {concepts.shape[1]} concepts"
            )
        return projections @ concepts.to(projections.dtype).T

    @staticmethod
    def interpolate_concepts(
        concept1: torch.Tensor, concept2: torch.Tensor, alpha: float | torch.Tensor
    ) -> torch.Tensor:
        """``(1 - α) c1 + α c2``: ``[d]`` for a number α, ``[n_alpha, d]`` for a 1-D tensor of α (no renormalising)."""
        if concept1.shape != concept2.shape:
            raise ValueError(f"concepts differ in shape: {tuple(concept1.shape)} vs {tuple(concept2.shape)}")
        if isinstance(alpha, torch.Tensor) and alpha.ndim == 1:
            alpha = alpha.to(concept1.dtype)[:, None]
        return (1 - alpha) * concept1 + alpha * concept2
