"""The images whose label looks wrong: confident learning on out-of-fold probabilities, and cross-class copies.

Every image is scored, test images included: a wrong test label corrupts the final score
as surely as a wrong train label corrupts the model. The list is advice to look at; it
never feeds the choice of strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from cnncodes.advise.basis import decompose
from cnncodes.advise.classes import encode_classes
from cnncodes.advise.labels import find_label_issues
from cnncodes.advise.probes import groups_by_size, logo_outputs, sign_targets

# The range of the inverse temperature that turns the probe's held-out outputs into probabilities.
_SHARPNESS = (-3.0, 8.0)  # natural logs


@dataclass(frozen=True)
class Suspect:
    """An image whose label looks wrong.

    Attributes:
        index: its position among the images scored.
        given: the class it is labelled with.
        suggested: the class the model finds most probable.
        probability_given: the out-of-fold probability of its given class.
        probability_suggested: that of the suggested class.
    """

    index: int
    given: str
    suggested: str
    probability_given: float
    probability_suggested: float


def out_of_fold_probabilities(
    codes: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, strength: float
) -> np.ndarray:
    """Each image's class probabilities from the ridge probe fitted without it (nor its near-duplicates).

    The held-out outputs are exact (leave-one-group-out from one SVD, as `advise` measures
    candidates); a softmax of them, sharpened by the one factor that minimises their
    log-loss, makes them probabilities that confident learning's per-class thresholds can
    be compared with.

    Args:
        codes: (n, d) codes of every image.
        labels: (n,) their classes.
        groups: (n,) near-duplicate groups: a group is held out whole.
        strength: the ridge strength the probe chose on these codes.

    Returns:
        (n, classes) probabilities, columns in sorted class order.
    """
    classes, index = encode_classes(labels)
    targets = sign_targets(index, classes=len(classes))
    basis = decompose(codes, standardise=True)
    outputs = logo_outputs(basis, targets, members=groups_by_size(groups), alpha=strength)

    def log_loss(log_sharpness: float) -> float:
        return -float(log_softmax(outputs * np.exp(log_sharpness), axis=1)[np.arange(len(index)), index].mean())

    best = minimize_scalar(log_loss, bounds=_SHARPNESS, method="bounded")
    return np.exp(log_softmax(outputs * np.exp(best.x), axis=1))


def suspects(labels: np.ndarray, probabilities: np.ndarray) -> list[Suspect]:
    """The images confident learning flags, most suspect first.

    Args:
        labels: (n,) given classes.
        probabilities: (n, classes) out-of-fold probabilities, columns in sorted class order.

    Returns:
        The flagged images.
    """
    classes, index = encode_classes(labels)
    issues = find_label_issues(labels=index, probabilities=probabilities)
    return [
        Suspect(
            index=int(i),
            given=str(classes[g]),
            suggested=str(classes[s]),
            probability_given=float(probabilities[i, g]),
            probability_suggested=float(probabilities[i, s]),
        )
        for i, g, s in zip(issues.indices, issues.given, issues.suggested)
    ]


def cross_class_copies(labels: np.ndarray, groups: np.ndarray) -> list[list[int]]:
    """Groups of near-duplicate images labelled with more than one class: one of the labels is wrong.

    Args:
        labels: (n,) given classes.
        groups: (n,) near-duplicate groups.

    Returns:
        The images of each such group, as positions.
    """
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(groups[order], return_index=True)
    members = np.split(order, starts[1:])
    return [sorted(m.tolist()) for m in members if len(np.unique(labels[m])) > 1]
