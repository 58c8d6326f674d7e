"""LogME of `advise`: its evidence against the closed form of Bayesian linear regression, N < D and N > D."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import null_space
from scipy.stats import multivariate_normal

from cnncodes.advise.basis import decompose
from cnncodes.advise.logme import log_evidence, log_me

GRID = np.logspace(-4, 4, 17)


def _data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return rng.normal(size=(n, d)) + 0.6 * rng.normal(size=(3, d))[labels], labels


def _closed_form(codes: np.ndarray, labels: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """log N(y | 0, β⁻¹I + α⁻¹FFᵀ) per class, with full matrices, for centred codes and one-hot columns.

    Centring leaves the data in the n - 1 dimensions orthogonal to the ones vector; both
    are written in an orthonormal basis of that subspace.
    """
    n = len(labels)
    basis = null_space(np.ones((1, n)))
    features = basis.T @ (codes - codes.mean(axis=0))
    covariance = np.eye(n - 1) / beta + features @ features.T / alpha
    onehot = (labels[:, None] == np.unique(labels)[None, :]).astype(float)
    return np.array([multivariate_normal(np.zeros(n - 1), covariance).logpdf(basis.T @ y) for y in onehot.T])


@pytest.mark.parametrize(("n", "d"), [(24, 70), (60, 9), (30, 30)])
@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 3.0), (20.0, 0.7)])
def test_evidence_is_the_closed_form(n, d, alpha, beta):
    codes, labels = _data(n, d)
    ours = log_evidence(decompose(codes), labels, alpha=alpha, beta=beta)
    np.testing.assert_allclose(ours, _closed_form(codes, labels, alpha, beta), rtol=1e-9)


@pytest.mark.parametrize(("n", "d"), [(24, 70), (60, 9)])
def test_maximised_evidence_beats_every_point_of_a_grid(n, d):
    codes, labels = _data(n, d, seed=1)
    basis = decompose(codes)
    result = log_me(basis, labels)
    grid_best = np.max([log_evidence(basis, labels, alpha=a, beta=b) for a in GRID for b in GRID], axis=0)
    assert np.all(result.evidences * n >= grid_best - 1e-9)
    at_fixed_point = [
        log_evidence(basis, labels, alpha=a, beta=b)[k] for k, (a, b) in enumerate(zip(result.alphas, result.betas))
    ]
    np.testing.assert_allclose(result.evidences * n, at_fixed_point)
    assert result.score == pytest.approx(result.evidences.mean())


def test_codes_that_carry_the_labels_score_higher():
    codes, labels = _data(80, 40, seed=2)
    noise = np.random.default_rng(3).normal(size=codes.shape)
    assert log_me(decompose(codes), labels).score > log_me(decompose(noise), labels).score


def test_constant_codes_score_the_labels_as_noise():
    """A tap that is constant over the images (rank 0) gets a finite score, that of the labels alone."""
    codes, labels = _data(30, 6, seed=4)
    constant = log_me(decompose(np.ones_like(codes)), labels)
    assert np.isfinite(constant.score)
    assert constant.score < log_me(decompose(codes), labels).score
