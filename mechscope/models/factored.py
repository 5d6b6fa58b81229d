"""``FactoredMatrix``: a matrix kept as the product of two thin factors, ``M = A @ B``.

Circuit matrices such as a head's OV circuit ``W_V W_O`` (``[d_model, d_model]``, rank ``d_head``) are far
cheaper to keep and decompose as their factors. Everything here works from the factors: the singular
value decomposition, the Frobenius norm and the eigenvalues only decompose matrices of the inner size,
and the full product is formed only when you ask for ``.AB``.

Shapes: ``A [..., m, k]`` and ``B [..., k, n]`` give ``M [..., m, n]``; leading (batch) dimensions
broadcast, so ``model.OV`` is one ``[n_layers, n_heads, d_model, d_model]`` factored matrix and
``model.OV[3, 5]`` the OV circuit of head 5 in layer 3.
"""

from __future__ import annotations

from functools import cached_property

import torch

_HALF = (torch.float16, torch.bfloat16)


def _decomposable(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype torch's QR, SVD and eig accept on every device (16-bit floats go to float32)."""
    return t.float() if t.dtype in _HALF else t


class FactoredMatrix:
    """The matrix ``A @ B`` ``[..., m, n]``, kept as ``A [..., m, k]`` and ``B [..., k, n]``.

    The SVD follows ``torch.linalg.svd``: ``U [..., m, r]``, ``S [..., r]``, ``Vh [..., r, n]`` with
    ``r = min(m, k, n)`` and ``U @ diag(S) @ Vh == A @ B`` (TransformerLens's ``Vh`` is the transpose
    of this one). 16-bit factors are decomposed in float32.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):  # noqa: N803 (the usual names of the factors)
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"both factors must be matrices [..., m, k] and [..., k, n]; got {A.shape} and {B.shape}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise ValueError(f"batch dimensions do not broadcast: A is {tuple(A.shape)}, B is {tuple(B.shape)}") from e
        self.A = A.broadcast_to(*batch, *A.shape[-2:])
        self.B = B.broadcast_to(*batch, *B.shape[-2:])

    # ---- shape -------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``[..., m, n]``, the shape of the product."""
        return torch.Size((*self.A.shape[:-1], self.B.shape[-1]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def mdim(self) -> int:
        """The inner size ``k`` (an upper bound on the rank)."""
        return self.A.shape[-1]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner={self.mdim})"

    def __getitem__(self, index) -> FactoredMatrix:
        """Index the batch dimensions only: ``OV[3]`` ``[n_heads, d_model, d_model]``, ``OV[3, 5]``, ``OV[:, 0]``."""
        key = index if isinstance(index, tuple) else (index,)
        used = sum(k is not None and k is not Ellipsis for k in key)
        if used > self.ndim - 2:
            raise IndexError(
                f"a FactoredMatrix of shape {tuple(self.shape)} has {self.ndim - 2} batch dimensions and indexes only "
                f"those; got {used} indices. Index the product (.AB) for single entries."
            )
        full = (*key, slice(None), slice(None))
        return FactoredMatrix(self.A[full], self.B[full])

    # ---- products ----------------------------------------------------------------------------------
    @property
    def AB(self) -> torch.Tensor:  # noqa: N802
        """The product ``A @ B`` ``[..., m, n]`` (formed now; can be large)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:  # noqa: N802
        """The reverse product ``B @ A`` ``[..., k, k]``; needs a square matrix (``m == n``)."""
        self._require_square("BA")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:  # noqa: N802
        """The transpose ``B^T A^T`` ``[..., n, m]``, still factored."""
        return FactoredMatrix(self.B.mT, self.A.mT)

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> torch.Tensor | FactoredMatrix:
        """``M @ other``: a FactoredMatrix for ``other [..., n, p]`` or another FactoredMatrix;
        ``[..., m]`` for a vector ``other [n]``."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        n = self.shape[-1]
        if other.shape[0 if other.ndim == 1 else -2] != n:
            raise ValueError(f"cannot multiply a FactoredMatrix of shape {tuple(self.shape)} by {tuple(other.shape)}")
        if other.ndim == 1:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        # keep the inner size the smaller of k and n
        return FactoredMatrix(self.A, self.B @ other) if n > self.mdim else FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor | FactoredMatrix:
        """``other @ M``: a factored matrix for ``other [..., p, m]``; ``[..., n]`` for a vector ``[m]``."""
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        m = self.shape[-2]
        if other.shape[-1] != m:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by a FactoredMatrix of shape {tuple(self.shape)}")
        if other.ndim == 1:
            return (other[None, :] @ self.A @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B) if m > self.mdim else FactoredMatrix(other, self.AB)

    # ---- decompositions ----------------------------------------------------------------------------
    @cached_property
    def _core(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Qa, C, Qb)`` with ``A @ B == Qa @ C @ Qb^H``: ``Qa [..., m, a]`` and ``Qb [..., n, b]`` have
        orthonormal columns, ``C [..., a, b]`` is small (``a = min(m, k)``, ``b = min(n, k)``).

        From the reduced QR decompositions ``A = Qa Ra`` and ``B^H = Qb Rb``: ``C = Ra Rb^H``.
        """
        qa, ra = torch.linalg.qr(_decomposable(self.A))
        qb, rb = torch.linalg.qr(_decomposable(self.B).mH)
        return qa, ra @ rb.mH, qb

    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qa, core, qb = self._core
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        return qa @ u, s, vh @ qb.mH

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U [..., m, r], S [..., r], Vh [..., r, n])`` with ``U @ diag(S) @ Vh == A @ B``, ``r = min(m, k, n)``.

        S is in descending order; U has orthonormal columns and Vh orthonormal rows. Computed from QR
        decompositions of the factors and an SVD of a core no larger than ``[k, k]``, never of the product.
        """
        return self._svd

    @property
    def U(self) -> torch.Tensor:  # noqa: N802
        """Left singular vectors ``[..., m, r]`` (columns)."""
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:  # noqa: N802
        """Singular values ``[..., r]``, descending."""
        return self._svd[1]

    @property
    def Vh(self) -> torch.Tensor:  # noqa: N802
        """Right singular vectors ``[..., r, n]`` (rows), as in ``torch.linalg.svd``."""
        return self._svd[2]

    def norm(self) -> torch.Tensor:
        """The Frobenius norm ``[...]``, from the small core (``||Qa C Qb^H|| = ||C||``)."""
        return torch.linalg.matrix_norm(self._core[1])

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues (complex) ``[..., min(m, k)]`` of a square ``A @ B``.

        When ``k < m`` these are the eigenvalues of ``B @ A`` ``[k, k]``: every nonzero eigenvalue of
        ``A @ B``, which also has ``m - k`` zeros not listed. Otherwise those of ``A @ B`` itself.
        """
        self._require_square("eigenvalues")
        small = self.B @ self.A if self.mdim < self.shape[-1] else self.AB
        return torch.linalg.eigvals(_decomposable(small))

    def _require_square(self, what: str) -> None:
        if self.shape[-1] != self.shape[-2]:
            raise ValueError(f"{what} needs a square matrix; this FactoredMatrix has shape {tuple(self.shape)}")
