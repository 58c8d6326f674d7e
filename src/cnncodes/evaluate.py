"""Scoring a fitted model on the test subset: the numbers every run record holds (see `records`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP_ROUNDS = 2000


def bootstrap_ci(correct: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[float]:
    """95% percentile interval of accuracy, resampling the test images."""
    if len(correct) == 0:
        return [0.0, 0.0]
    # Resampling n right/wrong answers with replacement counts the right ones binomially.
    means = np.random.default_rng(seed).binomial(len(correct), correct.mean(), size=rounds) / len(correct)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def score(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy with its interval, balanced accuracy, macro-F1, per-class scores and the confusion matrix."""
    from sklearn.metrics import (  # here, not at the top: `compare` reads records without scikit-learn
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y_pred = proba.argmax(axis=1)
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": bootstrap_ci((y_true == y_pred).astype(float)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def per_image_predictions(paths: Sequence[str], y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One line per test image, for reports that show the most confident mistakes."""
    return [
        {"path": path, "label": classes[t], "predicted": classes[int(p.argmax())], "probability": round(float(p.max()), 6)}
        for path, t, p in zip(paths, y_true, proba)
    ]
