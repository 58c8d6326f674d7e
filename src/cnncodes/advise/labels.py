"""Images whose label looks wrong, by confident learning (Northcutt et al., JAIR 2021).

From out-of-fold predicted probabilities, the rule of cleanlab's `find_label_issues`
with `filter_by="prune_by_noise_rate"`, written here in numpy so the package does not
depend on cleanlab (which the tests use as the oracle):

1. a class's threshold is the mean probability the model gives that class on the images
   labelled with it (its self-confidence): models are not equally sure of every class,
   so one cut-off for all would flag the hard classes wholesale;
2. the confident joint counts, per (given label, likely true class), the images whose
   probability reaches the threshold of that class (the most probable of several), then
   is calibrated so that each row sums to its class's size;
3. for each off-diagonal cell (given k, true j) it names that many images labelled k,
   those with the largest margin p_j - p_k;
4. an image the model still predicts as its given label is never flagged.

The flagged images are ranked from most to least suspect by self-confidence (the
probability of the given label) or by normalised margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from cnncodes.core.errors import CnnCodesError

# cleanlab's tolerance for comparing probabilities with thresholds and with each other.
_FUZZ = 1e-6
# A threshold no probability reaches, for a class no image is labelled with.
_UNREACHABLE = 2.0

RankBy = Literal["self_confidence", "normalized_margin"]


@dataclass(frozen=True)
class LabelIssues:
    """The images most likely mislabelled, most suspect first.

    Attributes:
        indices: (m,) image indices of the flagged images, ranked.
        given: (m,) their given class index.
        suggested: (m,) the class the model finds most probable for each.
        quality: (m,) the ranking score, ascending: lower is more suspect.
    """

    indices: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    quality: np.ndarray


def _check(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index, p = np.asarray(labels).reshape(-1), np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(index) or p.shape[1] < 2:
        raise CnnCodesError(f"probabilities of shape {p.shape} for {len(index)} labels: give (images, classes ≥ 2).")
    if not np.issubdtype(index.dtype, np.integer) or index.min() < 0 or index.max() >= p.shape[1]:
        raise CnnCodesError(f"labels must be class indices from 0 to {p.shape[1] - 1}, the probability columns.")
    return index, p


def _round_rows(matrix: np.ndarray) -> np.ndarray:
    """Round each row to integers keeping its rounded total: the entries closest to rounding the other way move."""
    ints = np.round(matrix)
    shortfall = (np.round(matrix.sum(axis=1)) - ints.sum(axis=1)).astype(np.int64)[:, None]
    order = np.argsort(matrix - ints, axis=1)
    ascending = np.empty_like(order)
    np.put_along_axis(ascending, order, np.arange(matrix.shape[1])[None, :], axis=1)
    descending = matrix.shape[1] - 1 - ascending
    ints += (shortfall > 0) & (descending < shortfall)
    ints -= (shortfall < 0) & (ascending < -shortfall)
    return ints.astype(np.int64)


def confident_joint(*, labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Calibrated counts of (given label, likely true class): the confident joint of confident learning.

    Its off-diagonal cells estimate how many images of each given class truly belong to
    each other class; `find_label_issues` names that many images per cell.

    Args:
        labels: (n,) given class index per image.
        probabilities: (n, c) out-of-fold predicted probabilities, columns in class order.

    Returns:
        (c, c) integer counts, rows the given class, columns the likely true class; each
        row sums to the number of images given that class.

    Raises:
        CnnCodesError: shapes that do not match, or labels outside the columns.
    """
    index, p = _check(labels, probabilities)
    classes = p.shape[1]
    sizes = np.bincount(index, minlength=classes)
    sums = np.bincount(index, weights=p[np.arange(len(index)), index], minlength=classes)
    thresholds = np.where(sizes > 0, sums / np.maximum(sizes, 1), _UNREACHABLE).clip(min=2 * _FUZZ)
    reached = p >= thresholds - _FUZZ
    likely = np.where(reached.sum(axis=1) > 1, p.argmax(axis=1), reached.argmax(axis=1))
    confident = reached.any(axis=1)
    # Counted as (true, given) and transposed, then scaled through the transpose, as cleanlab
    # does: the total is summed over the same memory order, so counts that land exactly on .5
    # round the same way.
    counts = np.zeros((classes, classes))
    np.add.at(counts, (likely[confident], index[confident]), 1.0)
    joint = counts.T
    np.fill_diagonal(joint, joint.diagonal().clip(min=1))
    joint = (joint.T / np.clip(joint.sum(axis=1), 1e-100, None) * sizes).T
    return _round_rows(joint / np.clip(np.sum(joint), 1e-100, None) * sizes.sum())


def _prune_counts(joint: np.ndarray) -> np.ndarray:
    """(true, given) counts of images to flag, each given class keeping at least one image (cleanlab's rule)."""
    counts = joint.T.astype(np.float64)
    diagonal = counts.diagonal().copy()
    raised = np.maximum(diagonal, 1.0)
    others = np.maximum(np.count_nonzero(counts, axis=0) - 1.0, 1.0)
    counts = np.maximum(counts - (raised - diagonal) / others, 0.0)
    np.fill_diagonal(counts, raised)
    return np.trunc(counts).astype(np.int64)


def _flag(index: np.ndarray, p: np.ndarray, prune: np.ndarray) -> np.ndarray:
    """Per true class j, the images of each given class k with the largest p_j - p_k, as many as prune[j, k]."""
    n, classes = p.shape
    sizes = np.bincount(index, minlength=classes)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    own = p[np.arange(n), index]
    flagged = np.zeros(n, dtype=bool)
    for true in range(classes):
        wanted = np.where((index != true) & (sizes[index] > 1), prune[true, index], 0)
        order = np.lexsort((own - p[:, true], index))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[index[order]]
        flagged |= rank < wanted
    return flagged


def label_quality(*, labels: np.ndarray, probabilities: np.ndarray, rank_by: RankBy = "self_confidence") -> np.ndarray:
    """How much each image's label is to be trusted, in [0, 1]: low means suspect.

    Args:
        labels: (n,) given class index per image.
        probabilities: (n, c) out-of-fold predicted probabilities.
        rank_by: "self_confidence", the probability of the given label, or
            "normalized_margin", (that probability - the largest other + 1) / 2, which also
            looks at how strongly another class is preferred.

    Returns:
        (n,) the scores.

    Raises:
        CnnCodesError: shapes that do not match, labels outside the columns, or an unknown `rank_by`.
    """
    index, p = _check(labels, probabilities)
    rows = np.arange(len(index))
    own = p[rows, index]
    if rank_by == "self_confidence":
        return own
    if rank_by == "normalized_margin":
        others = p.copy()
        others[rows, index] = -np.inf
        return (own - others.max(axis=1) + 1.0) / 2.0
    raise CnnCodesError(f"unknown ranking {rank_by!r}: use self_confidence or normalized_margin.")


def find_label_issues(
    *, labels: np.ndarray, probabilities: np.ndarray, rank_by: RankBy = "self_confidence"
) -> LabelIssues:
    """The images confident learning flags as mislabelled, most suspect first.

    The probabilities must be out-of-fold (each image scored by a model that did not see
    it): in-sample probabilities agree with the labels they were fit to, wrong ones
    included, and would flag almost nothing.

    Args:
        labels: (n,) given class index per image.
        probabilities: (n, c) out-of-fold predicted probabilities, columns in class order.
        rank_by: the score that orders the flagged images (see `label_quality`).

    Returns:
        The flagged images with their given and suggested classes; the same images, in
        the same order, as cleanlab's `find_label_issues(labels, pred_probs,
        filter_by="prune_by_noise_rate", return_indices_ranked_by=rank_by)`.

    Raises:
        CnnCodesError: shapes that do not match, labels outside the columns, or an unknown `rank_by`.
    """
    quality = label_quality(labels=labels, probabilities=probabilities, rank_by=rank_by)
    index, p = _check(labels, probabilities)
    flagged = _flag(index, p, _prune_counts(confident_joint(labels=index, probabilities=p)))
    nudged = p.copy()
    nudged[np.arange(len(index)), index] += _FUZZ
    flagged &= nudged.argmax(axis=1) != index
    ranked = np.flatnonzero(flagged)[np.argsort(quality[flagged], kind="stable")]
    return LabelIssues(indices=ranked, given=index[ranked], suggested=p[ranked].argmax(axis=1), quality=quality[ranked])
