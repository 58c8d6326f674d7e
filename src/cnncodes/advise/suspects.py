"""The images whose label looks wrong: confident learning on out-of-fold probabilities, and cross-class copies.

Every image is scored, test images included: a wrong test label corrupts the final score
as surely as a wrong train label corrupts the model. The list is advice to look at; it
never feeds the choice of strategy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cnncodes.advise.classes import encode_classes
from cnncodes.advise.labels import find_label_issues

# Folds of the out-of-fold probabilities (fewer when a class has fewer groups).
FOLDS = 5


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
    codes: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, strength: float, seed: int = 0
) -> np.ndarray:
    """Each image's class probabilities from a logistic regression that did not see it (nor its copies).

    Args:
        codes: (n, d) codes of every image.
        labels: (n,) their classes.
        groups: (n,) near-duplicate groups: a group is never split between a fit and its held-out images.
        strength: the ridge strength the probe chose on these codes; the regression's C is its inverse.
        seed: seeds the folds.

    Returns:
        (n, classes) probabilities, columns in sorted class order.
    """
    _, index = encode_classes(labels)
    smallest = int(np.bincount(index).min())
    folds = StratifiedGroupKFold(n_splits=max(2, min(FOLDS, smallest)), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / strength, max_iter=300))
    with warnings.catch_warnings():  # a few more iterations would move probabilities in the third decimal
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(model, codes, index, groups=groups, cv=folds, method="predict_proba")


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
