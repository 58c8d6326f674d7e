"""One SVD of a candidate's codes, shared by the ridge probes and LogME.

Both measurements only need the codes through their thin SVD `X = U diag(s) Vᵀ`: ridge
regression is rotation-invariant, so its fits, leave-one-out residuals and per-fold refits
can all be written with `U` and `s` (or `Z = U diag(s)`, the codes in their own basis, r
columns instead of d); and LogME's evidence depends on the features only through `s` and
`Uᵀy`. One decomposition per candidate therefore serves every regularisation strength,
every class and both measurements, and memory stays within the size of the codes: the
basis is (n, r) with r ≤ min(n, d), and the Gram matrix decomposed is min(n, d) square.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CodeBasis:
    """The thin SVD of centred codes, truncated to their numerical rank.

    Attributes:
        left: (n, r) orthonormal columns `U`, each orthogonal to the all-ones vector
            because the codes were centred.
        singular: (r,) singular values `s`, descending, all above the rank tolerance.
        dimensions: d, the number of code dimensions before the decomposition.
    """

    left: np.ndarray
    singular: np.ndarray
    dimensions: int

    @property
    def rank(self) -> int:
        """r, the numerical rank of the centred codes (at most min(n - 1, d))."""
        return int(self.singular.shape[0])

    @property
    def images(self) -> int:
        """n, the number of images (rows)."""
        return int(self.left.shape[0])

    @property
    def scores(self) -> np.ndarray:
        """(n, r) the centred codes in their principal axes, `U diag(s)`: same ridge fits as the codes."""
        return self.left * self.singular


def decompose(codes: np.ndarray, *, standardise: bool = False) -> CodeBasis:
    """Centre the codes (and optionally scale each dimension to unit variance), then take their thin SVD.

    Centring stands in for a linear model's intercept: it is left unpenalised, as
    scikit-learn's ridge leaves it. Standardising makes a fixed grid of regularisation
    strengths mean the same on codes of any scale (post-ReLU maxima are larger than
    averages); its statistics come from all images, so a held-out image has seen its own
    column means, a negligible leak for the comparison between candidates it serves.

    Both shapes are decomposed through the smaller Gram matrix (d×d when n > d, else n×n,
    which is no larger than the codes), several times cheaper than an SVD of (n, d);
    directions whose singular value is below the rank tolerance are dropped, which is
    what makes r the codes' rank.

    Args:
        codes: (n, d) one row of codes per image.
        standardise: divide each centred dimension by its standard deviation (constant
            dimensions are left at zero).

    Returns:
        The basis of the centred (standardised) codes.
    """
    x = np.array(codes, dtype=np.float64, copy=True)
    n, d = x.shape
    x -= x.mean(axis=0)
    if standardise:
        spread = x.std(axis=0)
        x /= np.where(spread > 0, spread, 1.0)
    eps = np.finfo(np.float64).eps
    if n > d:  # the d×d Gram matrix: its eigenvectors are V, and U = X V / s
        eigenvalues, vectors = np.linalg.eigh(x.T @ x)
    else:  # the n×n one, no larger than the codes: its eigenvectors are U itself
        eigenvalues, vectors = np.linalg.eigh(x @ x.T)
    singular = np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))
    keep = singular > singular[0] * np.sqrt(min(n, d) * eps)
    singular = singular[keep]
    left = (x @ vectors[:, ::-1][:, keep]) / singular if n > d else vectors[:, ::-1][:, keep]
    return CodeBasis(left=np.ascontiguousarray(left), singular=singular, dimensions=d)
