"""Scoring a fitted model on the test subset: the numbers every run record holds (see `records`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    """Each top-1 probability's bin among `ECE_BINS` equal-width ones (1.0 goes in the last)."""
    return np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)


def wilson_ci(correct: int, n: int) -> list[float]:
    """95% Wilson score interval of an accuracy: never zero-width at 0% or 100%, honest on small test sets."""
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def calibration(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """How far the probabilities can be trusted: log-loss, Brier score, ECE, and the selective-prediction AUROC.

    The Brier score sums the squared errors over classes (0 is perfect, 2 the worst). The
    expected calibration error compares, in 15 equal-width bins of top-1 probability, the
    mean probability with the accuracy, weighted by the share of images in the bin. The
    AUROC is the chance that a right prediction gets a higher top-1 probability than a wrong
    one (None when every prediction is right, or every one wrong).
    """
    from sklearn.metrics import log_loss, roc_auc_score

    confidence, right = proba.max(axis=1), proba.argmax(axis=1) == y_true
    onehot = np.eye(proba.shape[1])[y_true]
    bins = confidence_bins(confidence)
    ece = sum(abs(confidence[bins == b].mean() - right[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins))
    mixed = 0 < right.sum() < len(right)
    return {
        "log_loss": float(log_loss(y_true, proba, labels=np.arange(proba.shape[1]))),
        "brier": float(((proba - onehot) ** 2).sum(axis=1).mean()),
        "ece": float(ece),
        "confidence_auroc": float(roc_auc_score(right, confidence)) if mixed else None,
        "confidence_right": float(confidence[right].mean()) if right.any() else None,
        "confidence_wrong": float(confidence[~right].mean()) if (~right).any() else None,
    }


def score(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy with its interval, balanced accuracy, macro-F1, per-class scores, the confusion matrix and
    the calibration scores (`calibration`)."""
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
        "accuracy_ci95": wilson_ci(int((y_true == y_pred).sum()), len(y_true)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        # over the classes in the test set or predicted: one with no test image (all its images are
        # duplicates kept in train) has no F1 to average, not an F1 of 0, as balanced accuracy ignores it
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        **calibration(y_true, proba),
    }


def per_image_predictions(
    paths: Sequence[str], y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]
) -> list[dict]:
    """One line per test image, for reports that show the most confident mistakes."""
    return [
        {
            "path": path,
            "label": classes[t],
            "predicted": classes[int(p.argmax())],
            "probability": round(float(p.max()), 6),
        }
        for path, t, p in zip(paths, y_true, proba)
    ]


def mcnemar_p(right_a: np.ndarray, right_b: np.ndarray, alternative: str = "two-sided") -> float:
    """McNemar's exact test on two models right or wrong on the same images: the p-value that they differ,
    or with `alternative="less"` that model a is worse than model b.

    Only the images on which they disagree count: under the null hypothesis each of those is
    equally likely to favour either model, so each count is binomial(n, 1/2).
    """
    from scipy.stats import binomtest

    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    if only_a + only_b == 0:
        return 1.0
    if alternative == "less":
        return float(binomtest(only_b, only_a + only_b, 0.5, alternative="greater").pvalue)
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def paired_p(scores_a: Sequence[float], scores_b: Sequence[float], alternative: str = "two-sided") -> float:
    """Paired t-test over per-split scores of two runs on the same splits: the p-value that they differ, or with
    `alternative="less"` that run a scores lower (p = 1 when they never differ)."""
    from scipy.stats import ttest_rel

    differences = np.subtract(scores_a, scores_b)
    if not differences.any():
        return 1.0
    if np.ptp(differences) == 0:  # the same non-zero gap on every split: no spread to test against
        return 1.0 if alternative == "less" and differences[0] > 0 else 0.0
    return float(ttest_rel(scores_a, scores_b, alternative=alternative).pvalue)
