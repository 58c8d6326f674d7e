"""The classifier kinds on CNN codes: each scikit-learn estimator with its search grid, and the normalisations.

`CodesClassifier` composes them; this module only knows what each kind is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC
from sklearn.utils.class_weight import compute_class_weight

from cnncodes.core.choices import KINDS, NORMALIZERS


def estimator_for(kind: str, class_weight: Any) -> tuple[Any, dict[str, list]]:
    """The estimator of a kind and its search grid, set for standardised codes (see `CodesClassifier._grids`).

    Args:
        kind: one of `KINDS` but sgd, which `CodesClassifier` fits by streaming.
        class_weight: None, "balanced" or a dict, as scikit-learn takes it.

    Returns:
        The unfitted estimator and its grid of hyper-parameters.
    """
    if kind == "linear-svm":
        # libsvm's linear kernel: on a few thousand codes it fits in a fraction of a second,
        # where liblinear's LinearSVC needs minutes for large C on standardised codes.
        return (
            SVC(kernel="linear", class_weight=class_weight, decision_function_shape="ovo"),
            {"C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]},
        )
    if kind == "logreg":
        return LogisticRegression(class_weight=class_weight, max_iter=3000), {"C": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
    if kind == "rbf-svm":
        return (
            SVC(kernel="rbf", class_weight=class_weight, decision_function_shape="ovo"),
            {"C": [1.0, 10.0, 100.0], "gamma": [0.0625, 0.25, 1.0, 4.0]},
        )
    if kind == "knn":
        return WeightedNeighbors(class_weight=class_weight), {"n_neighbors": [1, 3, 5, 9, 15, 25]}
    raise ValueError(f"unknown classifier {kind!r}: use one of {', '.join(KINDS)}")


class WeightedNeighbors(KNeighborsClassifier):
    """Distance-weighted k-NN whose votes are scaled by class weights, like the other kinds' losses.

    It keeps its codes in float32, `CodesClassifier`'s dtype, and asks in it: float64 queries on
    float32 codes would copy them all on every call.
    """

    def __init__(self, n_neighbors: int = 5, class_weight: Any = None):
        super().__init__(n_neighbors=n_neighbors, weights="distance")
        self.class_weight = class_weight

    def fit(self, X, y):
        super().fit(np.asarray(X, dtype=np.float32), y)
        self.vote_weights_ = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        return self

    def predict_proba(self, X):
        votes = super().predict_proba(np.asarray(X, dtype=np.float32)) * self.vote_weights_
        return votes / np.maximum(votes.sum(axis=1, keepdims=True), np.finfo(float).tiny)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def normalizer(normalize: str) -> Any:
    """The transformer of a `--normalize` choice (auto is searched over the others by `CodesClassifier`)."""
    if normalize == "standard":
        return StandardScaler()
    if normalize == "l2":
        return Normalizer()
    if normalize == "none":
        return FunctionTransformer()
    raise ValueError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZERS)}")


def weighted_accuracy(codes: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> float:
    """Accuracy with each image counted by its class's weight (`weights` by class code)."""
    return float(accuracy_score(codes, predicted, sample_weight=weights[codes]))


def held_out_score(metric: Callable[[np.ndarray, np.ndarray], float], model: Any, X: Any, codes: np.ndarray) -> float:
    """A GridSearchCV scorer: `metric` of the model's predictions of held-out codes."""
    return metric(codes, model.predict(X))
