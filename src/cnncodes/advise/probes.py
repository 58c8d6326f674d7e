"""Held-out accuracy of a linear probe on a candidate's codes, over a grid of ridge strengths.

The probe is scikit-learn's `RidgeClassifier`: one-vs-rest least squares on ±1 targets
with an unpenalised intercept, predicting the class of the largest output. It is the
cheapest linear model whose held-out accuracy is exact in closed form, so every candidate
(depth, pooling, concatenation) is scored at every strength from one SVD:

- leave-one-out: a linear smoother's held-out residual is `(y_i - ŷ_i) / (1 - h_ii)`,
  with the hat matrix `H = 11ᵀ/n + U diag(s²/(s²+α)) Uᵀ`; only its diagonal is needed.
- leave-one-group-out: when near-duplicates exist, leave-one-out would score an image
  by its own copy left in training. The same identity holds for a block: a group G
  held out has residuals `(I - H_GG)⁻¹ (y_G - ŷ_G)`, an m×m solve for a group of m
  images; groups of equal size are solved together. Exact, and as cheap as
  leave-one-out for the pairs and triples near-duplicates form.
- group k-fold: whole groups held out in k folds (`StratifiedGroupKFold`); each fold is
  refit on the r columns of `U diag(s)` (ridge does not see the rotation), with one r×r
  eigendecomposition per fold serving every strength: k times the cost of the SVD.

The strength is chosen by held-out accuracy, the first best in grid order (as
`RidgeClassifierCV` does). The chosen number is optimistic by the selection over the
grid, the same for every candidate, so it ranks candidates fairly but overstates each.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from cnncodes.advise.basis import CodeBasis
from cnncodes.advise.classes import encode_classes
from cnncodes.core.errors import CnnCodesError

# Ridge strengths from nearly unregularised to strongly shrunk, for codes of unit variance per dimension
# (`decompose(..., standardise=True)`); codes of another scale want the grid scaled by their variance.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 5, 15))


@dataclass(frozen=True)
class ProbeResult:
    """A candidate's held-out accuracy over the grid and at the chosen strength.

    Attributes:
        scheme: "leave-one-out" or "group k-fold".
        alphas: the grid, in the order given.
        accuracies: (len(alphas),) held-out accuracy at each strength.
        alpha: the chosen strength (first best held-out accuracy).
        accuracy: held-out accuracy at `alpha`.
        train_accuracy: accuracy of the fit on all images at `alpha`, on those images:
            far above `accuracy`, the probe overfits and more images would help.
        predictions: (n,) each image's held-out predicted class at `alpha`, an index into
            the sorted distinct labels.
        correct: (n,) whether that prediction is the image's label: the per-image vector
            the paired bootstrap compares between candidates.
    """

    scheme: str
    alphas: tuple[float, ...]
    accuracies: np.ndarray
    alpha: float
    accuracy: float
    train_accuracy: float
    predictions: np.ndarray
    correct: np.ndarray


def sign_targets(index: np.ndarray, *, classes: int) -> np.ndarray:
    """One-vs-rest targets, +1 for the image's class and -1 elsewhere, as `RidgeClassifier` fits.

    Args:
        index: (n,) class indices in [0, classes).
        classes: the number of classes.

    Returns:
        (n, classes) float64 targets.
    """
    targets = -np.ones((len(index), classes))
    targets[np.arange(len(index)), index] = 1.0
    return targets


def _shrinkage(basis: CodeBasis, alpha: float) -> np.ndarray:
    """(r,) how much of each principal direction the ridge fit keeps, s² / (s² + α)."""
    squared = basis.singular**2
    return squared / (squared + alpha)


def fitted_outputs(basis: CodeBasis, targets: np.ndarray, *, alpha: float) -> np.ndarray:
    """The ridge fit on all images, evaluated on them: `H y` without forming H.

    Args:
        basis: the SVD of the centred codes.
        targets: (n, c) targets.
        alpha: ridge strength, > 0.

    Returns:
        (n, c) fitted outputs, intercept included.
    """
    mean = targets.mean(axis=0)
    projected = basis.left.T @ (targets - mean)
    return mean + basis.left @ (_shrinkage(basis, alpha)[:, None] * projected)


def loo_outputs(basis: CodeBasis, targets: np.ndarray, *, alpha: float) -> np.ndarray:
    """Exact leave-one-out outputs of the ridge fit: each image scored by the fit on the other n - 1.

    Uses `ŷ_(-i) = y_i - (y_i - ŷ_i) / (1 - h_ii)`, exact for any penalised least squares
    with a fixed penalty (the intercept unpenalised, so refitting it without image i is
    included); `h_ii = 1/n + Σ_j U_ij² s_j²/(s_j²+α)`, computed row by row.

    Args:
        basis: the SVD of the centred codes.
        targets: (n, c) targets.
        alpha: ridge strength, > 0.

    Returns:
        (n, c) held-out outputs; the same numbers as `RidgeClassifierCV(store_cv_results=True)`
        stores as predictions.
    """
    leverage = 1.0 / basis.images + np.einsum("ij,j,ij->i", basis.left, _shrinkage(basis, alpha), basis.left)
    residuals = targets - fitted_outputs(basis, targets, alpha=alpha)
    return targets - residuals / (1.0 - leverage)[:, None]


def _check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(a) for a in alphas)
    if not grid or min(grid) <= 0:
        raise CnnCodesError(f"ridge strengths {list(grid)} must be a non-empty list of numbers > 0.")
    return grid


def _result(
    scheme: str,
    grid: tuple[float, ...],
    predicted: np.ndarray,
    index: np.ndarray,
    basis: CodeBasis,
    targets: np.ndarray,
) -> ProbeResult:
    """The first best strength by held-out accuracy, from (len(grid), n) predicted class indices."""
    accuracies = (predicted == index).mean(axis=1)
    best = int(np.argmax(accuracies))
    fitted = fitted_outputs(basis, targets, alpha=grid[best])
    return ProbeResult(
        scheme=scheme,
        alphas=grid,
        accuracies=accuracies,
        alpha=grid[best],
        accuracy=float(accuracies[best]),
        train_accuracy=float((fitted.argmax(axis=1) == index).mean()),
        predictions=predicted[best],
        correct=predicted[best] == index,
    )


def loo_probe(basis: CodeBasis, labels: np.ndarray, *, alphas: Sequence[float] = DEFAULT_ALPHAS) -> ProbeResult:
    """Leave-one-out accuracy of the ridge probe at every strength, from the one SVD.

    Right when every image is its own group; with near-duplicates use `group_kfold_probe`.

    Args:
        basis: the SVD of the candidate's centred codes.
        labels: (n,) each image's class.
        alphas: ridge strengths to try, each > 0.

    Returns:
        The result; `predictions` hold class indices into the sorted distinct labels.

    Raises:
        CnnCodesError: fewer than 2 classes or 2 images per class, or a strength ≤ 0.
    """
    grid = _check_alphas(alphas)
    classes, index = encode_classes(labels)
    targets = sign_targets(index, classes=len(classes))
    predicted = np.stack([loo_outputs(basis, targets, alpha=a).argmax(axis=1) for a in grid])
    return _result("leave-one-out", grid, predicted, index, basis, targets)


def _checked_groups(groups: np.ndarray, basis: CodeBasis) -> np.ndarray:
    flat = np.asarray(groups).reshape(-1)
    if len(flat) != basis.images:
        raise CnnCodesError(f"got {len(flat)} group ids for {basis.images} images: give one per image.")
    return flat


def groups_by_size(groups: np.ndarray) -> list[np.ndarray]:
    """The images of each group, gathered as one (groups, m) index array per group size m.

    Args:
        groups: (n,) a group id per image.

    Returns:
        For each distinct size, the member indices of every group of that size, a row per group.
    """
    order = np.argsort(groups, kind="stable")
    _, starts, sizes = np.unique(np.asarray(groups)[order], return_index=True, return_counts=True)
    return [order[starts[sizes == m][:, None] + np.arange(m)] for m in np.unique(sizes)]


def logo_outputs(basis: CodeBasis, targets: np.ndarray, *, members: list[np.ndarray], alpha: float) -> np.ndarray:
    """Exact leave-one-group-out outputs: each group scored by the fit on all images outside it.

    The block form of the leave-one-out identity, `ŷ_(-G) = y_G - (I - H_GG)⁻¹ (y_G - ŷ_G)`,
    with `H_GG = 11ᵀ/n + U_G diag(s²/(s²+α)) U_Gᵀ`; with every group a single image it is
    `loo_outputs`.

    Args:
        basis: the SVD of the centred codes.
        targets: (n, c) targets.
        members: the groups, as `groups_by_size` returns them.
        alpha: ridge strength, > 0.

    Returns:
        (n, c) held-out outputs, the same as refitting without each group in turn.
    """
    shrinkage = _shrinkage(basis, alpha)
    residuals = targets - fitted_outputs(basis, targets, alpha=alpha)
    outputs = np.empty_like(targets)
    for rows in members:
        left = basis.left[rows]
        hat = 1.0 / basis.images + np.einsum("gir,r,gjr->gij", left, shrinkage, left)
        outputs[rows] = targets[rows] - np.linalg.solve(np.eye(rows.shape[1]) - hat, residuals[rows])
    return outputs


def logo_probe(
    basis: CodeBasis, labels: np.ndarray, *, groups: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> ProbeResult:
    """Leave-one-group-out accuracy of the ridge probe at every strength, from the one SVD.

    Each group of near-duplicates is held out whole and scored by the fit on all other
    images: as many training images as leave-one-out leaves, so candidates are scored
    alike whether or not the data has duplicates.

    Args:
        basis: the SVD of the candidate's centred codes.
        labels: (n,) each image's class.
        groups: (n,) a group id per image, equal for near-duplicates.
        alphas: ridge strengths to try, each > 0.

    Returns:
        The result; `predictions` hold class indices into the sorted distinct labels.

    Raises:
        CnnCodesError: fewer than 2 classes or 2 images per class, group ids not one per
            image, a single group, or a strength ≤ 0.
    """
    grid = _check_alphas(alphas)
    classes, index = encode_classes(labels)
    groups = _checked_groups(groups, basis)
    if len(np.unique(groups)) < 2:
        raise CnnCodesError("all images are near-duplicates of one another: nothing is left to hold out.")
    members = groups_by_size(groups)
    targets = sign_targets(index, classes=len(classes))
    predicted = np.stack([logo_outputs(basis, targets, members=members, alpha=a).argmax(axis=1) for a in grid])
    return _result("leave-one-group-out", grid, predicted, index, basis, targets)


def _fold_outputs(
    scores: np.ndarray, targets: np.ndarray, train: np.ndarray, held: np.ndarray, grid: tuple[float, ...]
) -> Iterator[np.ndarray]:
    """The held-out outputs of ridge refit on one fold's training rows, one (n_held, c) array per strength.

    The fold's own centring gives the intercept, as a fit on those rows alone would; one
    eigendecomposition of its r×r Gram matrix solves every strength.
    """
    x = scores[train]
    centre = x.mean(axis=0)
    x -= centre
    mean = targets[train].mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(x.T @ x)
    projected = vectors.T @ (x.T @ (targets[train] - mean))
    rotated = (scores[held] - centre) @ vectors
    for alpha in grid:
        yield mean + rotated @ (projected / (eigenvalues + alpha)[:, None])


def group_kfold_probe(
    basis: CodeBasis,
    labels: np.ndarray,
    *,
    groups: np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    folds: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """Held-out accuracy of the ridge probe with whole groups of near-duplicates held out together.

    Folds are `StratifiedGroupKFold(folds, shuffle=True, random_state=seed)`: class
    proportions kept per fold as far as groups allow, and no group spans training and
    held-out rows, so a copy never vouches for its twin.

    Args:
        basis: the SVD of the candidate's centred codes.
        labels: (n,) each image's class.
        groups: (n,) a group id per image, equal for near-duplicates.
        alphas: ridge strengths to try, each > 0.
        folds: number of folds.
        seed: shuffles the groups into folds, so a run can be repeated.

    Returns:
        The result; `predictions` hold class indices into the sorted distinct labels.

    Raises:
        CnnCodesError: too few classes, images or groups for the folds, or a strength ≤ 0.
    """
    grid = _check_alphas(alphas)
    classes, index = encode_classes(labels)
    groups = _checked_groups(groups, basis)
    distinct = len(np.unique(groups))
    if folds < 2 or distinct < folds:
        raise CnnCodesError(
            f"cannot make {folds} folds from {distinct} groups of near-duplicates: use 2 to {distinct} folds."
        )
    scores, targets = basis.scores, sign_targets(index, classes=len(classes))
    predicted = np.empty((len(grid), basis.images), dtype=np.intp)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a class smaller than `folds`: its folds just lack it
        splits = list(splitter.split(scores, index, groups))
    for train, held in splits:
        for row, outputs in enumerate(_fold_outputs(scores, targets, train, held, grid)):
            predicted[row, held] = outputs.argmax(axis=1)
    return _result("group k-fold", grid, predicted, index, basis, targets)


def probe(
    basis: CodeBasis,
    labels: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> ProbeResult:
    """The held-out accuracy `advise` uses: leave-one-out, or leave-one-group-out when near-duplicates exist.

    Leave-one-out is exact and uses every image but one for each fit; it is only wrong
    when an image's copy stays in training, which is what a group of two or more means.
    Both are exact and cost about the same; `group_kfold_probe` is the k-fold alternative.

    Args:
        basis: the SVD of the candidate's centred codes.
        labels: (n,) each image's class.
        groups: (n,) near-duplicate group per image, or None when there are none.
        alphas: ridge strengths to try, each > 0.

    Returns:
        The result of the scheme that fits the data.

    Raises:
        CnnCodesError: as `loo_probe` and `logo_probe`.
    """
    if groups is None or len(np.unique(_checked_groups(groups, basis))) == basis.images:
        return loo_probe(basis, labels, alphas=alphas)
    return logo_probe(basis, labels, groups=groups, alphas=alphas)
