"""LogME (You et al., ICML 2021): how well a candidate's codes explain the labels, without training.

Per class, the one-hot label column is modelled as Bayesian linear regression on the
codes, `y = F w + ε` with `w ~ N(0, α⁻¹ I)` and `ε ~ N(0, β⁻¹ I)`; the score is the log
evidence `log p(y | F, α, β)` maximised over α and β by MacKay's fixed point, per image,
averaged over classes. Higher means the codes fit the labels with less to learn.

Two choices differ from the reference implementation (thuml/LogME):

- the evidence is written with the features' RANK r, not their dimension d. In
  `d/2 log α - ½ log|αI + βFᵀF|`, the d - r zero eigenvalues of FᵀF contribute
  `-(d - r)/2 log α`, which cancels all but `r/2 log α`. The reference keeps d in
  the first term but sums the second over only the r non-zero eigenvalues, adding a
  spurious `(d - r)/2 log α` whenever n < d (thuml/LogME issue #23) and so favouring wide
  codes on small datasets, exactly the comparison `advise` makes.
- the codes come from the shared `CodeBasis`, which is centred, so the labels are centred
  too: an intercept left free, as in the ridge probes. Centring removes one dimension
  of the data, so the evidence is that of the centred labels in the n - 1 dimensions
  orthogonal to the all-ones vector (otherwise it grows without bound as β → ∞).

Everything needs only `s` and `Uᵀy`, so all classes iterate together on (r, c) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncodes.advise.basis import CodeBasis
from cnncodes.advise.classes import encode_classes

# Floors for ‖m‖² and ‖y - Fm‖², which vanish only for labels the codes cannot see or fit exactly.
_FLOOR = 1e-12


@dataclass(frozen=True)
class LogMe:
    """A candidate's LogME score and the fixed point it came from.

    Attributes:
        score: mean over classes of the maximised log evidence divided by n.
        evidences: (c,) each class's maximised log evidence divided by n.
        alphas: (c,) each class's prior precision at the fixed point.
        betas: (c,) each class's noise precision at the fixed point.
        iterations: fixed-point steps taken until the evidence stopped moving.
    """

    score: float
    evidences: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    iterations: int


@dataclass(frozen=True)
class _Projected:
    """The labels as the evidence sees them: `Uᵀy` (r, c), ‖y‖² (c,), s² (r,), n - 1."""

    coordinates: np.ndarray
    totals: np.ndarray
    squared: np.ndarray
    samples: int


def _project(basis: CodeBasis, labels: np.ndarray) -> _Projected:
    classes, index = encode_classes(labels)
    onehot = np.zeros((len(index), len(classes)))
    onehot[np.arange(len(index)), index] = 1.0
    onehot -= onehot.mean(axis=0)
    return _Projected(
        coordinates=basis.left.T @ onehot,
        totals=(onehot**2).sum(axis=0),
        squared=basis.singular[:, None] ** 2,
        samples=basis.images - 1,
    )


def _fit_terms(p: _Projected, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """γ (effective number of parameters), ‖m‖² and ‖y - Fm‖² at the posterior mean for α/β = `ratio` (c,)."""
    squared, x2 = p.squared, p.coordinates**2
    kept = squared / (squared + ratio)
    gamma = kept.sum(axis=0)
    weights = (squared * x2 / (squared + ratio) ** 2).sum(axis=0)
    residual = (x2 * (1.0 - kept) ** 2).sum(axis=0) + np.maximum(p.totals - x2.sum(axis=0), 0.0)
    return gamma, np.maximum(weights, _FLOOR), np.maximum(residual, _FLOOR)


def _evidence(p: _Projected, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    _, weights, residual = _fit_terms(p, alpha / beta)
    rank = p.squared.shape[0]
    return (
        rank / 2.0 * np.log(alpha)
        + p.samples / 2.0 * np.log(beta)
        - 0.5 * np.log(alpha + beta * p.squared).sum(axis=0)
        - beta / 2.0 * residual
        - alpha / 2.0 * weights
        - p.samples / 2.0 * np.log(2.0 * np.pi)
    )


def log_evidence(basis: CodeBasis, labels: np.ndarray, *, alpha: float, beta: float) -> np.ndarray:
    """Each class's log evidence at a given prior and noise precision, not maximised.

    The quantity LogME maximises, exposed so it can be checked against the closed form
    `log N(y | 0, β⁻¹I + α⁻¹FFᵀ)` and plotted over (α, β).

    Args:
        basis: the SVD of the candidate's centred codes.
        labels: (n,) each image's class.
        alpha: prior precision of the weights, > 0.
        beta: noise precision, > 0.

    Returns:
        (c,) the log evidence of each class's centred one-hot column (not divided by n),
        classes in sorted order.

    Raises:
        CnnCodesError: fewer than 2 classes or 2 images per class.
    """
    p = _project(basis, labels)
    classes = p.totals.shape[0]
    return _evidence(p, np.full(classes, float(alpha)), np.full(classes, float(beta)))


def log_me(basis: CodeBasis, labels: np.ndarray, *, max_iterations: int = 200, tolerance: float = 1e-7) -> LogMe:
    """LogME of a candidate's codes: the log evidence per class maximised over α and β, per image.

    MacKay's fixed point, `α = γ/‖m‖²`, `β = (n - 1 - γ)/‖y - Fm‖²`, with
    `γ = Σ s²/(s² + α/β)`, from α = β = 1, all classes at once, until no class's
    evidence per image moves by more than `tolerance`. The stop is on the evidence, not on
    α: a class the codes do not explain has its maximum at α → ∞ (weights → 0), which α
    approaches without ever settling while the evidence has long converged.

    Args:
        basis: the SVD of the candidate's centred codes.
        labels: (n,) each image's class.
        max_iterations: cap on fixed-point steps.
        tolerance: change of every class's log evidence per image that counts as converged.

    Returns:
        The score and its fixed point.

    Raises:
        CnnCodesError: fewer than 2 classes or 2 images per class.
    """
    p = _project(basis, labels)
    alpha, beta = np.ones(p.totals.shape[0]), np.ones(p.totals.shape[0])
    evidences = _evidence(p, alpha, beta) / basis.images
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        gamma, weights, residual = _fit_terms(p, alpha / beta)
        alpha = np.maximum(gamma / weights, _FLOOR)  # γ = 0 only for codes of rank 0, where α plays no part
        beta = np.maximum(p.samples - gamma, _FLOOR) / residual
        previous, evidences = evidences, _evidence(p, alpha, beta) / basis.images
        if np.all(np.abs(evidences - previous) <= tolerance):
            break
    return LogMe(score=float(evidences.mean()), evidences=evidences, alphas=alpha, betas=beta, iterations=iterations)
