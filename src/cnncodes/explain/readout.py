"""How a classifier of pooled codes reads the feature maps behind them: the maps of class evidence.

A code is the mean, over its views (scales, mirror image), of the spatial mean of the tapped
feature maps. A linear model on it (logistic regression, linear SVM, SGD) with its
normalisation and PCA is an affine function of the code, so its class score splits exactly
into one score per cell of each view's map, a class activation map (Zhou et al. 2016): the
mean of the map plus the intercept is the decision score. Other models (RBF SVM, k-NN) and
max-pooled codes get occlusion in feature space instead: how much the class's probability
drops when one cell is left out of the pooled code. No extra forward pass either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import SVC

from cnncodes.classify.calibration import class_probabilities
from cnncodes.core.errors import CnnCodesError

LINEAR_KINDS = frozenset({"linear-svm", "logreg", "sgd"})
CAM = "cam"
OCCLUSION = "occlusion"


@dataclass(frozen=True)
class ClassMaps:
    """One batch's evidence maps for the explained classes, a map per view of each image.

    Attributes:
        method: `cam` (exact, in decision-score units) or `occlusion` (drop in probability).
        views: per view, (images, rows, columns, explained classes) maps.
        intercepts: (images, explained classes): what the maps' mean (over views and cells)
            is short of the class's decision score; zeros for occlusion.
    """

    method: str
    views: list[np.ndarray]
    intercepts: np.ndarray


def pool(view: np.ndarray, pooling: str) -> np.ndarray:
    """A view's code: the spatial mean (`avg`) or maximum (`max`) of its maps, (images, channels)."""
    return view.max(axis=(1, 2)) if pooling == "max" else view.mean(axis=(1, 2))


def pooled(views: Sequence[np.ndarray], pooling: str) -> np.ndarray:
    """The codes of the images whose maps are `views`: the mean of the views' pooled maps."""
    return np.mean([pool(view.astype(np.float64), pooling) for view in views], axis=0)


def class_scores(pipeline: Pipeline, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's decision score, the quantity a class activation map explains.

    Logistic regression gives its logits and SGD its one-vs-rest margins; a linear SVM, whose
    margins are one-vs-one, gives each class half the sum of its margins over every other
    class. A binary model's one score d becomes -d/2 and d/2, so a logistic model's softmax
    of the class scores is its own probability.

    Args:
        pipeline: a fitted CodesClassifier's `model_` (normalisation, PCA, linear model).
        X: (rows, features) codes.
        n_classes: the classes of the problem.

    Returns:
        (rows, n_classes) scores.
    """
    decision = np.asarray(pipeline.decision_function(np.asarray(X, dtype=np.float64)), dtype=np.float64)
    return decision.reshape(len(X), -1) @ _to_classes(pipeline, n_classes)


def _to_classes(pipeline: Pipeline, n_classes: int) -> np.ndarray:
    """The matrix taking the model's decision columns to class scores (see `class_scores`)."""
    if n_classes == 2:
        return np.array([[-0.5, 0.5]])
    if not isinstance(pipeline[-1], SVC):
        return np.eye(n_classes)
    first, second = np.triu_indices(n_classes, k=1)
    to = np.zeros((len(first), n_classes))
    to[np.arange(len(first)), first], to[np.arange(len(first)), second] = 0.5, -0.5
    return to


@dataclass(frozen=True)
class LinearReadout:
    """A linear model's class scores as weights on the raw code: score = s(x) · x @ weights + intercept.

    s(x) is 1/‖x‖ when the model's normalisation is `l2`, else 1: everything after it
    (standardisation, PCA, the model) is affine, so its weights are read off its scores on the
    unit vectors, exactly.
    """

    weights: np.ndarray
    intercept: np.ndarray
    l2: bool

    @classmethod
    def of(cls, pipeline: Pipeline, n_classes: int, dim: int) -> LinearReadout:
        """The readout of a fitted linear pipeline on `dim`-long codes."""
        l2 = isinstance(pipeline[0], Normalizer)
        affine = pipeline[1:] if l2 else pipeline
        at = class_scores(affine, np.vstack([np.zeros(dim), np.eye(dim)]), n_classes)
        return cls(weights=at[1:] - at[0], intercept=at[0], l2=l2)

    def scale(self, codes: np.ndarray) -> np.ndarray:
        """s(x) of each code, as scikit-learn's `Normalizer` divides (a zero code is left as it is)."""
        if not self.l2:
            return np.ones(len(codes))
        norms = np.linalg.norm(codes, axis=1)
        return 1 / np.where(norms > 0, norms, 1.0)


def evidence(
    model: Any, views: Sequence[np.ndarray], pooling: str, kind: str, explained: np.ndarray, n_classes: int
) -> ClassMaps:
    """The maps of evidence for the classes `explained` (an (images, k) array of class indices).

    Args:
        model: the bundle's fitted `CodesClassifier`.
        views: per view, (images, rows, columns, channels) feature maps.
        pooling: how the extractor pools them (`avg` or `max`).
        kind: the classifier's kind; linear kinds on average-pooled codes get exact CAM.
        explained: the classes to explain, (images, k).
        n_classes: the classes of the problem.

    Returns:
        The maps.
    """
    if kind in LINEAR_KINDS and pooling == "avg":
        return _cam(model, views, explained, n_classes)
    return _occlusion(model, views, pooling, explained, n_classes)


def _cam(model: Any, views: Sequence[np.ndarray], explained: np.ndarray, n_classes: int) -> ClassMaps:
    codes = pooled(views, "avg")
    readout = LinearReadout.of(model.model_, n_classes, codes.shape[1])
    scale = readout.scale(codes)[:, None, None, None]
    per_image = readout.weights.T[explained]  # (images, k, channels)
    maps = [scale * np.einsum("nhwc,nkc->nhwk", view.astype(np.float64), per_image) for view in views]
    return ClassMaps(CAM, maps, readout.intercept[explained])


def _occlusion(
    model: Any, views: Sequence[np.ndarray], pooling: str, explained: np.ndarray, n_classes: int
) -> ClassMaps:
    """The drop of each explained class's probability when one cell of one view is left out of the code."""
    codes = pooled(views, pooling)
    before = np.take_along_axis(class_probabilities(model, codes, n_classes), explained, axis=1)
    maps = []
    for view in views:
        without = _codes_without_each_cell(view.astype(np.float64), pooling) - pool(view, pooling)[:, None]
        n, cells = len(view), view.shape[1] * view.shape[2]
        moved = codes[:, None] + without / len(views)  # (images, cells, channels)
        after = class_probabilities(model, moved.reshape(n * cells, -1), n_classes).reshape(n, cells, -1)
        drop = before[:, None] - np.take_along_axis(after, explained[:, None], axis=2)
        maps.append(drop.reshape(n, view.shape[1], view.shape[2], -1))
    return ClassMaps(OCCLUSION, maps, np.zeros(explained.shape))


def _codes_without_each_cell(view: np.ndarray, pooling: str) -> np.ndarray:
    """(images, cells, channels): the view's pooled code with each cell left out in turn."""
    n, h, w, c = view.shape
    cells = view.reshape(n, h * w, c)
    if h * w < 2:
        raise CnnCodesError("the feature map has a single cell: there is nothing to locate in it")
    if pooling != "max":
        return (cells.sum(axis=1, keepdims=True) - cells) / (h * w - 1)
    top_two = np.sort(cells, axis=1)[:, -2:]  # per channel, the largest and the runner-up
    is_top = cells >= top_two[:, 1:2]
    return np.where(is_top, top_two[:, 0:1], top_two[:, 1:2])
