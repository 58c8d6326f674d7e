"""Calibrated class probabilities: informative scores divided by one fitted temperature.

Measured on real MobileNetV2 codes of ../shared/datasets (docs/results.md): a softmax of
SVC's one-vs-rest decision scores encodes little more than one-vs-one vote ranks, so its
top-1 probability barely told right from wrong predictions. Every kind instead turns
informative scores into probabilities with one temperature fitted on out-of-fold scores
(group-aware folds): SVMs their one-vs-one margins, as pairwise probabilities coupled into
class probabilities (libsvm's method); logistic regression and k-NN the log of their own
probabilities, and SGD its one-vs-rest margins, through a softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import isqrt
from typing import Any, Protocol

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.base import clone
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

# Probabilities are floored here before their log: k-NN gives exact zeros.
_FLOOR = 1e-4
# Out-of-fold codes the temperature is fitted on, at most.
_CALIBRATION_ROWS = 2000


class FittedClassifier(Protocol):
    """What `class_probabilities` needs of a model: the classes it saw and probabilities over them."""

    classes_: np.ndarray

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities over `classes_`, a row per code."""


def informative_scores(model: Pipeline, X: np.ndarray, n_classes: int) -> np.ndarray:
    """The scores `calibrated_probabilities` tempers, laid out for all `n_classes` classes.

    An SVM gives its one-vs-one margins, a column per pair of classes (`np.triu_indices`
    order, + favouring the first). Other models give a column per class: the log of their
    probabilities, or SGD's margins; a class the model never saw (a calibration fold without
    it) gets the row's lowest score.

    In float64: a small temperature magnifies float32 rounding, which differs between one row
    and many (BLAS), so an image's probabilities moved in the 5th decimal with its batch.

    Args:
        model: a fitted pipeline ending in the classifier; its classes are codes 0..n_classes-1.
        X: codes, a row per image.
        n_classes: the classes of the whole problem, which the model may not all have seen.

    Returns:
        (rows, pairs) margins for an SVM, else (rows, n_classes) scores.
    """
    X = np.asarray(X, dtype=np.float64)
    seen = model.classes_
    if isinstance(model[-1], SVC):
        margins = model.decision_function(X).reshape(len(X), -1).astype(np.float64)
        if len(seen) == 2:  # scikit-learn's binary margin favours the second class, its pairs the first
            margins = -margins
        return _all_pairs(margins, seen, n_classes)
    if isinstance(model[-1], SGDClassifier):
        found = one_vs_rest_margins(model.decision_function(X))
    else:
        found = np.log(np.maximum(model.predict_proba(X), _FLOOR))
    found = found.astype(np.float64)  # float32 codes give float32 scores, too coarse for a softmax summing to 1
    scores = np.repeat(found.min(axis=1, keepdims=True), n_classes, axis=1)
    scores[:, seen] = found
    return scores


def _all_pairs(margins: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """An SVM's margins over the pairs of the `seen` classes, spread over every pair of `n_classes`.

    A pair with one class never seen has that class lose for certain; a pair of two unseen classes is a tie.
    """
    if len(seen) == n_classes:  # every fitted model, and so every prediction: its pairs are all the pairs
        return margins
    first, second = np.triu_indices(n_classes, 1)
    known = np.isin(np.arange(n_classes), seen)
    certain = np.where(known[first], np.inf, -np.inf)
    scores = np.tile(np.where(known[first] == known[second], 0.0, certain), (len(margins), 1))
    column = np.zeros((n_classes, n_classes), dtype=int)
    column[first, second] = np.arange(len(first))
    pairs = np.triu_indices(len(seen), 1)
    scores[:, column[seen[pairs[0]], seen[pairs[1]]]] = margins
    return scores


def calibrated_probabilities(model: Pipeline, scores: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities from `informative_scores` of `model`: coupled pairs for an SVM, else a softmax.

    Args:
        model: the pipeline the scores came from (its last step decides how they combine).
        scores: `informative_scores(model, ...)`.
        temperature: what the scores are divided by (`fit_temperature`).

    Returns:
        (rows, classes) probabilities, each row summing to 1.
    """
    if isinstance(model[-1], SVC):
        return coupled_probabilities(scores, temperature)
    return _softmax(scores / temperature)


def coupled_probabilities(margins: np.ndarray, temperature: float, block: int = 256) -> np.ndarray:
    """Class probabilities from one-vs-one `margins`, the first class of a pair beating the second with
    probability expit(margin / temperature).

    Wu, Lin and Weng's second method (JMLR 2004), the one libsvm uses for `probability=True`:
    the p minimising the sum over pairs of (r_ji p_i - r_ij p_j)² with sum(p) = 1, one small
    linear system per image. A softmax of summed margins instead ranked right against wrong
    predictions far worse on Flowers-17 (AUROC 0.83 against 0.93 for linear-svm, 5 splits).

    Args:
        margins: (rows, pairs), a column per pair in `np.triu_indices` order, + favouring the first class.
        temperature: what the margins are divided by.
        block: images solved at a time, bounding memory.

    Returns:
        (rows, classes) probabilities, each row summing to 1.
    """
    k = (1 + isqrt(1 + 8 * margins.shape[1])) // 2  # k classes make k(k-1)/2 pairs
    first, second = np.triu_indices(k, 1)
    out = np.zeros((len(margins), k))
    for start in range(0, len(margins), block):
        part = expit(margins[start : start + block] / temperature)
        r = np.zeros((len(part), k, k))
        r[:, first, second], r[:, second, first] = part, 1 - part
        system = np.zeros((len(part), k + 1, k + 1))
        system[:, :k, :k] = -r * r.transpose(0, 2, 1)
        system[:, np.arange(k), np.arange(k)] = (r.transpose(0, 2, 1) ** 2).sum(axis=2)
        system[:, :k, k] = system[:, k, :k] = 1.0
        rhs = np.zeros((len(part), k + 1, 1))
        rhs[:, k] = 1.0
        p = np.maximum(np.linalg.solve(system, rhs)[:, :k, 0], 0.0)
        out[start : start + len(part)] = p / p.sum(axis=1, keepdims=True)
    return out


def one_vs_rest_margins(decision: np.ndarray) -> np.ndarray:
    """A linear model's one-vs-rest margins, a column per class.

    Args:
        decision: its `decision_function`: (rows, classes), or (rows,) for two classes.

    Returns:
        (rows, classes) margins; a binary margin is split ± between its two classes.
    """
    return decision.reshape(len(decision), -1) if decision.ndim == 2 else np.column_stack([-decision, decision]) / 2


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: Callable[[float], np.ndarray], codes: np.ndarray) -> float:
    """The temperature whose probabilities of out-of-fold scores have the lowest log-loss.

    Hand-made because `CalibratedClassifierCV(method="temperature")` scales an SVM's
    one-vs-rest decision function, the uninformative vote ranks, rather than its margins.

    Args:
        probabilities: the probabilities of the out-of-fold scores at a temperature.
        codes: the true class code of each of their rows.

    Returns:
        The temperature, searched between e^-8 and e^8.
    """

    def log_loss(log_t: float) -> float:
        return float(-np.log(probabilities(np.exp(log_t))[np.arange(len(codes)), codes] + 1e-300).mean())

    return float(np.exp(minimize_scalar(log_loss, bounds=(-8.0, 8.0), method="bounded").x))


def out_of_fold_scores(
    model: Pipeline, X: np.ndarray, codes: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of held-out codes, each by a copy of `model` fitted without its fold, to fit the temperature on.

    At most `_CALIBRATION_ROWS` codes: one temperature needs no more, and an SVM's scores have a
    column per pair of classes.

    Args:
        model: the chosen pipeline (unfitted copies of it are fitted per fold).
        X: every code the folds index.
        codes: their class codes.
        folds: (train rows, held-out rows) pairs.

    Returns:
        The `informative_scores` of the held-out codes kept, and their rows in X.
    """
    n_classes = len(np.unique(codes))
    kept = np.zeros(len(X), dtype=bool)
    held = np.unique(np.concatenate([test for _, test in folds]))
    kept[np.random.default_rng(0).permutation(held)[:_CALIBRATION_ROWS]] = True
    parts = []
    for train, test in folds:
        if len(test := test[kept[test]]):
            parts.append((test, informative_scores(clone(model).fit(X[train], codes[train]), X[test], n_classes)))
    rows = np.concatenate([test for test, _ in parts])
    return np.vstack([found for _, found in parts]), rows


def class_probabilities(model: FittedClassifier, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes of a problem, whether or not the model saw each in training.

    Args:
        model: a fitted classifier whose `classes_` are class indices (a `CodesClassifier` of a run).
        X: codes, a row per image.
        n_classes: the classes of the problem.

    Returns:
        (rows, n_classes) probabilities, zero for classes the model never saw.
    """
    proba = np.zeros((len(X), n_classes), dtype=np.float64)
    proba[:, model.classes_] = model.predict_proba(X)
    return proba
