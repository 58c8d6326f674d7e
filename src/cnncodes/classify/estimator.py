"""Classical classifiers on CNN codes, as one small scikit-learn estimator.

`CodesClassifier(kind=...)` is normalisation, optional PCA and a linear SVM, logistic
regression, RBF SVM or k-NN, with the normalisation and hyper-parameters chosen by
cross-validation on folds that keep duplicate groups together; or `sgd`, a linear SVM or
logistic regression fitted by SGD on codes read a chunk at a time (data larger than memory).

Probabilities, measured on real MobileNetV2 codes of ../shared/datasets (docs/results.md):
a softmax of SVC's one-vs-rest decision scores encodes little more than one-vs-one vote
ranks, so its top-1 probability barely told right from wrong predictions. Every kind now
turns informative scores into probabilities with one temperature fitted on out-of-fold
scores (group-aware folds): SVMs their one-vs-one margins, as pairwise probabilities
coupled into class probabilities (libsvm's method); logistic regression and k-NN the log of
their own probabilities, through a softmax. The predicted label stays the fitted model's
decision: where the probabilities' top class differs from it (a near tie), the two swap places.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from itertools import product
from math import isqrt
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from cnncodes.codes.features import Features, load_features
from cnncodes.core.choices import KINDS, MAX_EXACT, NORMALIZERS
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import make_folder
from cnncodes.core.progress import progress_bar, warn
from cnncodes.runs.bundle import publish_bundle
from cnncodes.runs.evaluate import per_image_predictions, score
from cnncodes.runs.records import build_record, refuse_to_replace, repeat_score, repeats_summary, run_name

_LINEAR = {"linear-svm", "logreg"}
# `--normalize auto` searches each of the others with its own grid.
_AUTO = tuple(n for n in NORMALIZERS if n != "auto")
# Probabilities are floored here before their log: k-NN gives exact zeros.
_FLOOR = 1e-4
# Above `MAX_EXACT` training codes (see choices.py) `--classifier all` leaves these out, and `sgd`,
# their streaming stand-in, takes their place.
_QUADRATIC = ("linear-svm", "rbf-svm", "knn")
_EXACT = ("linear-svm", "logreg", "rbf-svm", "knn")
_SCALABLE = ("logreg", "sgd")
# `sgd`: codes read per `partial_fit` call (one chunk in memory at a time), passes over them, and its grid.
SGD_CHUNK = 4096
_SGD_EPOCHS = 10
# ...and at least this many updates: 10 passes over a few dozen codes leave SGD far from converged.
_SGD_UPDATES = 20_000
_SGD_LOSSES = ("hinge", "log_loss")  # a linear SVM, logistic regression
_SGD_ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2)
# Out-of-fold codes the probabilities' temperature is fitted on, at most.
_CALIBRATION_ROWS = 2000
_SGD_WITH_PCA = "--pca needs the codes in memory: the sgd classifier streams them, use it without --pca"


def _estimator(kind: str, class_weight: Any) -> tuple[Any, dict[str, list]]:
    """The estimator of a kind and its search grid, set for standardised codes (see `CodesClassifier._grid`)."""
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
        return _WeightedNeighbors(class_weight=class_weight), {"n_neighbors": [1, 3, 5, 9, 15, 25]}
    raise ValueError(f"unknown classifier {kind!r}: use one of {', '.join(KINDS)}")


class _WeightedNeighbors(KNeighborsClassifier):
    """Distance-weighted k-NN whose votes are scaled by class weights, like the other kinds' losses."""

    def __init__(self, n_neighbors: int = 5, class_weight: Any = None):
        super().__init__(n_neighbors=n_neighbors, weights="distance")
        self.class_weight = class_weight

    def fit(self, X, y):
        super().fit(X, y)
        self.vote_weights_ = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        return self

    def predict_proba(self, X):
        # in the training codes' dtype: float64 queries on float32 codes would copy them all on every call
        X = np.asarray(X, dtype=self._fit_X.dtype)
        votes = super().predict_proba(X) * self.vote_weights_
        return votes / np.maximum(votes.sum(axis=1, keepdims=True), np.finfo(float).tiny)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _normalizer(normalize: str):
    if normalize == "standard":
        return StandardScaler()
    if normalize == "l2":
        return Normalizer()
    if normalize == "none":
        return FunctionTransformer()
    raise ValueError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZERS)}")


class CodesClassifier(ClassifierMixin, BaseEstimator):
    """A classifier of CNN codes whose normalisation and hyper-parameters are chosen by cross-validation.

    `cv` is a number of stratified folds or any scikit-learn splitter (e.g. a
    `PredefinedSplit` that scores on a validation subset). `fit(X, y, groups=...)` keeps
    images of one duplicate group in one fold. After `fit`, `best_params_` holds the chosen
    values (with `normalize`), `cv_score_` their cross-validated score, `temperature_`
    the calibration of the probabilities, `grid_edges_` the parameters chosen at an end of
    their grid (a hint that the grid is too narrow for these codes), `n_folds_` and
    `n_components_` the folds and PCA components used (small data allows fewer than asked
    for), and `n_views_` the views of each code it was trained on (see `fit`).
    """

    def __init__(
        self,
        kind: str = "linear-svm",
        normalize: str = "auto",
        pca: int | None = None,
        class_weight: Any = None,
        cv: Any = 5,
        n_jobs: int | None = -1,
        random_state: int = 0,
        chunk_size: int = SGD_CHUNK,
    ):
        self.chunk_size = chunk_size
        self.kind = kind
        self.normalize = normalize
        self.pca = pca
        self.class_weight = class_weight
        self.cv = cv
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, groups=None, views=None):
        """Choose and fit on codes `X`; with `views` (rows, views, features), whose mean per row is X, on every view.

        Training on each view of an image (e.g. its code at each scale) teaches the model what
        does not change its class; the search scores each candidate on the held-out images'
        codes X, as the model will be used, and folds keep an image's views together. `sgd`
        streams X alone.
        """
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        self._check_settings(codes)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        if self.kind == "sgd":
            return self._fit_streaming(X, np.arange(len(X)), codes, groups)
        smallest = int(np.bincount(codes).min())
        folds = self._folds(X, codes, groups, smallest, self.cv)
        calibration = self._folds(X, codes, groups, smallest, 3)
        every = slice(None)  # the rows the model is fitted on: a slice, so X[every] copies nothing
        self.n_views_ = 1
        if views is not None:
            X, codes, every, (folds, calibration) = self._on_views(X, codes, views, (folds, calibration))
        fold = min(len(train) for train, _ in folds + calibration)
        estimator, grid = _estimator(self.kind, self._code_weights())
        pipeline = Pipeline([("normalize", StandardScaler()), ("pca", "passthrough"), ("model", estimator)])
        grids = self._grids(grid, X[every], fold)
        search = GridSearchCV(
            pipeline,
            grids,
            cv=folds,
            n_jobs=self.n_jobs,
            refit=False,
            scoring="balanced_accuracy" if self.class_weight else "accuracy",
        )
        # One BLAS thread per fit: the parallelism is across candidates (n_jobs), and small fits on a
        # busy machine spend more time waking idle BLAS threads than computing (measured: 10-100x).
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(X, codes)
            chosen = search.best_params_
            self.model_ = clone(pipeline).set_params(**chosen).fit(X[every], codes[every])
            scores, rows = _out_of_fold_scores(self.model_, X, codes, calibration)
            self.temperature_ = _fit_temperature(partial(_probabilities, self.model_, scores), codes[rows])
        self._record_choice(search, grids)
        self.n_folds_ = len(folds)
        self.n_components_ = self.model_.named_steps["pca"].n_components_ if self.pca else None
        return self

    def _on_views(self, X, codes, views, folds_lists):
        """The codes followed by every view, their classes, the views' rows, and folds that train on views.

        Each fold trains on the views of its training images and scores their codes X.
        """
        views = np.asarray(views, dtype=np.float32)
        if views.ndim != 3 or views.shape[0] != len(X) or views.shape[2] != X.shape[1]:
            raise ValueError(f"views must be (rows, views, {X.shape[1]}) for {len(X)} rows, got {views.shape}")
        n, self.n_views_ = views.shape[:2]

        def seen(rows: np.ndarray) -> np.ndarray:
            return n + (rows[:, None] * self.n_views_ + np.arange(self.n_views_)).ravel()

        stacked = np.vstack([X, views.reshape(n * self.n_views_, -1)])
        moved = [[(seen(train), held) for train, held in folds] for folds in folds_lists]
        return stacked, np.concatenate([codes, np.repeat(codes, self.n_views_)]), slice(n, None), moved

    def _record_choice(self, search: GridSearchCV, grids: list[dict[str, list]]) -> None:
        """`best_params_` by name (the normalisation's, not its object), the CV score, and choices on a grid's edge."""
        chosen = search.best_params_
        name, searched = next(
            (n, g) for n, g in zip(self._normalizations(), grids) if g["normalize"][0] is chosen["normalize"]
        )
        self.best_params_ = {
            "normalize": name,
            **{k.removeprefix("model__"): v for k, v in chosen.items() if k.startswith("model__")},
        }
        self.cv_score_ = float(search.best_score_)
        self.grid_edges_ = [
            k.removeprefix("model__")
            for k, values in searched.items()
            if len(values) > 2 and chosen[k] in (min(values), max(values))
        ]

    def fit_rows(self, X, y, rows: np.ndarray, groups=None, views=None) -> CodesClassifier:
        """Fit on `X[rows]`; `sgd` reads them a chunk at a time, so X may be memory-mapped codes larger than memory.

        The other kinds need their codes in memory and fit on the copy `X[rows]` (and `views[rows]`).
        """
        rows = np.sort(np.asarray(rows))
        groups = np.arange(len(rows)) if groups is None else np.asarray(groups)[rows]
        if self.kind != "sgd":
            return self.fit(X[rows], np.asarray(y)[rows], groups=groups, views=None if views is None else views[rows])
        self.n_features_in_ = X.shape[1]
        self.classes_, codes = np.unique(np.asarray(y)[rows], return_inverse=True)
        self._check_settings(codes)
        return self._fit_streaming(X, rows, codes, groups)

    def _fit_streaming(self, X, rows: np.ndarray, codes: np.ndarray, groups: np.ndarray) -> CodesClassifier:
        """`sgd`: normalisation, loss and alpha chosen on one held-out fold (with `cv=0` the val subset), then refit.

        One fold, not k: each candidate is several passes over codes that may not fit in memory.
        The temperature is fitted like the other kinds', on out-of-fold scores of 3 group-aware folds:
        one held-out fold is often predicted without a mistake, which drives the temperature to zero.
        """
        smallest = int(np.bincount(codes).min())
        folds = self._folds(rows, codes, groups, smallest, self.cv)
        train, held = folds[0]
        fit = _StreamingFit(X, len(self.classes_), self._code_weights(), self.chunk_size, self.random_state)
        metric = balanced_accuracy_score if self.class_weight else accuracy_score
        best = -1.0
        for normalize in self._normalizations():
            scaler = fit.scaler(rows[train], normalize)
            for loss, alpha in product(_SGD_LOSSES, _SGD_ALPHAS):
                model = fit.model(rows[train], codes[train], scaler, loss, alpha)
                held_codes = fit.scores(model, rows[held]).argmax(axis=1)
                if (found := float(metric(codes[held], held_codes))) > best:  # the first of equals, as GridSearchCV
                    best, chosen = found, (normalize, loss, alpha)
        self.model_ = fit.fitted(rows, codes, *chosen)
        out_of_fold = np.zeros((len(rows), len(self.classes_)))
        for part, rest in self._folds(rows, codes, groups, smallest, 3):
            out_of_fold[rest] = fit.scores(fit.fitted(rows[part], codes[part], *chosen), rows[rest])
        self.temperature_ = _fit_temperature(partial(_probabilities, self.model_, out_of_fold), codes)
        self.best_params_ = {"normalize": chosen[0], "loss": chosen[1], "alpha": chosen[2]}
        self.cv_score_ = best
        self.n_folds_, self.n_components_, self.n_views_ = len(folds), None, 1
        self.grid_edges_ = ["alpha"] if chosen[2] in (min(_SGD_ALPHAS), max(_SGD_ALPHAS)) else []
        return self

    def _code_weights(self) -> Any:
        """The class weights by class code: a dict names classes by label; the models see their codes."""
        if isinstance(self.class_weight, dict):
            return {code: self.class_weight.get(label, 1.0) for code, label in enumerate(self.classes_)}
        return self.class_weight

    def _check_settings(self, codes: np.ndarray) -> None:
        """scikit-learn's ValueErrors for bad data or settings (`fit_svm` turns them into one-line errors)."""
        if len(self.classes_) < 2:
            raise ValueError("training needs images of at least two classes (got one class)")
        if np.bincount(codes).min() < 2:
            raise ValueError(
                "every class needs at least 2 training images (train+val) to choose hyper-parameters "
                "and calibrate probabilities: add images to the smallest class"
            )
        if not (self.class_weight in (None, "balanced") or isinstance(self.class_weight, dict)):
            raise ValueError(f"class_weight takes 'balanced', a dict or None (got {self.class_weight!r})")
        if isinstance(self.class_weight, dict) and (unknown := set(self.class_weight) - set(self.classes_.tolist())):
            raise ValueError(f"class_weight names classes not among the training labels: {sorted(map(str, unknown))}")
        if isinstance(self.cv, int) and self.cv < 2:
            raise ValueError(f"cv takes 2 or more folds, or a splitter such as PredefinedSplit (got {self.cv})")
        if self.n_jobs == 0:
            raise ValueError("n_jobs must not be 0: use -1 for all cores or a positive number")
        if self.normalize != "auto":
            _normalizer(self.normalize)
        if self.kind == "sgd" and self.pca:
            raise ValueError(_SGD_WITH_PCA)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {self.chunk_size})")

    def _folds(self, X, codes, groups, smallest: int, cv: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stratified folds that never split a duplicate group (a copy in both halves flatters memorising models)."""
        splitter = (
            cv
            if not isinstance(cv, int)
            else StratifiedGroupKFold(
                n_splits=max(2, min(cv, smallest, len(np.unique(groups)))), shuffle=True, random_state=self.random_state
            )
        )
        # scikit-learn warns of a class with fewer groups than folds, and of a PredefinedSplit ignoring groups
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return [(train, test) for train, test in splitter.split(X, codes, groups) if len(test)]

    def _grids(self, grid: dict[str, list], X: np.ndarray, fold: int) -> list[dict[str, list]]:
        """One grid per normalisation searched, each moved to the spread of the codes the model sees.

        The grids suit standardised codes, whose total variance is their length. Scaling codes
        by s is the same problem as scaling a linear model's C by 1/s² (the intercept takes the
        mean), and `gamma` is relative to 1/(total variance), scikit-learn's "scale": so
        `--normalize l2` or `none`, and PCA, search the same effective range. Trained on several
        views of each image, a model's C is divided by their number (the loss is the same sum
        over images) and k-NN's k multiplied by it (an image's views are its neighbours' votes).
        """
        grids = []
        for name in self._normalizations():
            steps: list[tuple[str, Any]] = [("normalize", _normalizer(name))]
            if self.pca:  # every CV fold must be able to fit that many components
                steps.append(
                    ("pca", PCA(n_components=min(self.pca, fold - 1, X.shape[1]), random_state=self.random_state))
                )
            moved = dict(grid)
            if "gamma" in grid or self.kind in _LINEAR:
                seen = Pipeline(steps).fit_transform(X)
                spread = float(seen.var(axis=0).sum()) or 1.0
                if "gamma" in grid:
                    moved["gamma"] = [g / spread for g in grid["gamma"]]
                if self.kind in _LINEAR:
                    moved["C"] = [c * seen.shape[1] / spread for c in grid["C"]]
            if "C" in moved:  # an image's views share its one vote: the loss of each counts 1/views
                moved["C"] = [c / self.n_views_ for c in moved["C"]]
            if "n_neighbors" in grid:  # k counts images, each `n_views_` codes; every fold needs k training codes
                moved["n_neighbors"] = [k * self.n_views_ for k in grid["n_neighbors"] if k * self.n_views_ <= fold]
            grids.append({**{step: [obj] for step, obj in steps}, **{f"model__{k}": v for k, v in moved.items()}})
        return grids

    def _normalizations(self) -> tuple[str, ...]:
        return _AUTO if self.normalize == "auto" else (self.normalize,)

    def _decide(self, X) -> tuple[np.ndarray, np.ndarray]:
        """The model's decision (class indices) and calibrated probabilities whose top class it is."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)  # see `_scores`
        decision = self.model_.predict(X)
        proba = _probabilities(self.model_, _scores(self.model_, X, len(self.classes_)), self.temperature_)
        rows = np.nonzero(proba.argmax(axis=1) != decision)[0]
        top = proba[rows].argmax(axis=1)
        proba[rows, top], proba[rows, decision[rows]] = proba[rows, decision[rows]], proba[rows, top]
        return decision, proba

    def predict_proba(self, X) -> np.ndarray:
        return self._decide(X)[1]

    def predict(self, X) -> np.ndarray:
        decision, _ = self._decide(X)
        return self.classes_[decision]


def _scores(model: Pipeline, X: np.ndarray, n_classes: int) -> np.ndarray:
    """The scores `_probabilities` calibrates with a temperature, laid out for all `n_classes` classes.

    An SVM gives its one-vs-one margins, a column per pair of classes (`np.triu_indices`
    order, + favouring the first); a pair with a class it never saw (a calibration fold without
    it) has that class lose for certain. Other models give a column per class: the log of
    their probabilities or their margins, a class never seen getting the row's lowest score.

    In float64: a small temperature magnifies float32 rounding, which differs between one row
    and many (BLAS), so an image's probabilities moved in the 5th decimal with its batch.
    """
    X = np.asarray(X, dtype=np.float64)
    seen = model.classes_
    if isinstance(model[-1], SVC):
        margins = model.decision_function(X).reshape(len(X), -1).astype(np.float64)
        if len(seen) == 2:  # scikit-learn's binary margin favours the second class, its pairs the first
            margins = -margins
        if len(seen) == n_classes:  # every fitted model, and so every prediction: its pairs are all the pairs
            return margins
        first, second = np.triu_indices(n_classes, 1)
        known = np.isin(np.arange(n_classes), seen)
        certain = np.where(known[first], np.inf, -np.inf)
        scores = np.tile(np.where(known[first] == known[second], 0.0, certain), (len(X), 1))
        column = np.zeros((n_classes, n_classes), dtype=int)
        column[first, second] = np.arange(len(first))
        pairs = np.triu_indices(len(seen), 1)
        scores[:, column[seen[pairs[0]], seen[pairs[1]]]] = margins
        return scores
    if isinstance(model[-1], SGDClassifier):
        found = _margins(model.decision_function(X))
    else:
        found = np.log(np.maximum(model.predict_proba(X), _FLOOR))
    found = found.astype(np.float64)  # float32 codes give float32 scores, too coarse for a softmax summing to 1
    scores = np.repeat(found.min(axis=1, keepdims=True), n_classes, axis=1)
    scores[:, seen] = found
    return scores


def _probabilities(model: Pipeline, scores: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities from `_scores` of `model`'s kind: coupled pairs for an SVM, else a softmax."""
    if isinstance(model[-1], SVC):
        return _coupled(scores, temperature)
    return _softmax(scores / temperature)


def _coupled(margins: np.ndarray, temperature: float, block: int = 256) -> np.ndarray:
    """Class probabilities from one-vs-one `margins` (a column per pair, + favouring the first class).

    The first class of a pair beats the second with probability expit(margin / temperature).

    Wu, Lin and Weng's second method (JMLR 2004), the one libsvm uses for `probability=True`:
    the p minimising the sum over pairs of (r_ji p_i - r_ij p_j)² with sum(p) = 1, one small
    linear system per image, solved `block` images at a time to bound memory. A softmax of
    summed margins instead ranked right against wrong predictions far worse on Flowers-17
    (AUROC 0.83 against 0.93 for linear-svm, 5 splits).
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


def _margins(decision: np.ndarray) -> np.ndarray:
    """A linear model's one-vs-rest margins per class; a binary margin split ± between its two classes."""
    return decision.reshape(len(decision), -1) if decision.ndim == 2 else np.column_stack([-decision, decision]) / 2


def _chunks(positions: np.ndarray, size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Positions in chunks, in order or shuffled by `rng`; a shuffled chunk is sorted, so a memmap is read forward.

    Codes are stored class by class: a chunk of consecutive rows would hold one class.
    """
    if rng is None:
        return [positions[i : i + size] for i in range(0, len(positions), size)]
    order = rng.permutation(positions)
    return [np.sort(order[i : i + size]) for i in range(0, len(order), size)]


class _StreamingFit:
    """Fits `sgd` candidates on rows of X one chunk in memory at a time, in shuffled chunks, over several epochs."""

    def __init__(self, X, n_classes: int, weights: Any, chunk_size: int, seed: int):
        self.X, self.classes, self.chunk_size, self.seed = X, np.arange(n_classes), chunk_size, seed
        self.weights = weights

    def scaler(self, rows: np.ndarray, normalize: str) -> Any:
        """The normalisation fitted on `rows` in one pass, shared by every candidate fitted on those rows."""
        scaler = _normalizer(normalize)
        for chunk in _chunks(rows, self.chunk_size):
            scaler.partial_fit(self.X[chunk]) if isinstance(scaler, StandardScaler) else scaler.fit(self.X[chunk])
        return scaler

    def model(self, rows: np.ndarray, codes: np.ndarray, scaler: Any, loss: str, alpha: float) -> Pipeline:
        weights = self.weights
        if weights == "balanced":  # partial_fit takes no "balanced": the weights it would compute, from all rows
            seen = np.unique(codes)
            weights = dict(zip(seen.tolist(), compute_class_weight(weights, classes=seen, y=codes)))
        sgd = SGDClassifier(loss=loss, alpha=alpha, class_weight=weights, random_state=self.seed)
        rng = np.random.default_rng(self.seed)
        # Fewer codes than a chunk: each chunk holds them several times, rather than thousands of tiny calls.
        positions = np.tile(np.arange(len(rows)), max(1, self.chunk_size // len(rows)))
        for _ in range(max(_SGD_EPOCHS, -(-_SGD_UPDATES // len(positions)))):
            for chunk in _chunks(positions, self.chunk_size, rng):
                sgd.partial_fit(scaler.transform(self.X[rows[chunk]]), codes[chunk], classes=self.classes)
        return Pipeline([("normalize", scaler), ("model", sgd)])

    def fitted(self, rows: np.ndarray, codes: np.ndarray, normalize: str, loss: str, alpha: float) -> Pipeline:
        return self.model(rows, codes, self.scaler(rows, normalize), loss, alpha)

    def scores(self, model: Pipeline, rows: np.ndarray) -> np.ndarray:
        parts = [
            _margins(model.decision_function(np.asarray(self.X[chunk], np.float64)))
            for chunk in _chunks(rows, self.chunk_size)
        ]
        return np.vstack(parts)


def _out_of_fold_scores(model: Pipeline, X: np.ndarray, codes: np.ndarray, folds) -> tuple[np.ndarray, np.ndarray]:
    """Scores of at most `_CALIBRATION_ROWS` codes, each by the model fitted without its fold, and their rows.

    One temperature needs no more, and an SVM's scores have a column per pair of classes.
    """
    n_classes = len(np.unique(codes))
    kept = np.zeros(len(X), dtype=bool)
    held = np.unique(np.concatenate([test for _, test in folds]))
    kept[np.random.default_rng(0).permutation(held)[:_CALIBRATION_ROWS]] = True
    parts = []
    for train, test in folds:
        if len(test := test[kept[test]]):
            parts.append((test, _scores(clone(model).fit(X[train], codes[train]), X[test], n_classes)))
    rows = np.concatenate([test for test, _ in parts])
    return np.vstack([found for _, found in parts]), rows


def _softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def _fit_temperature(probabilities: Callable[[float], np.ndarray], codes: np.ndarray) -> float:
    """The temperature whose `probabilities(temperature)` of out-of-fold scores have the lowest log-loss.

    Hand-made because `CalibratedClassifierCV(method="temperature")` scales an SVM's
    one-vs-rest decision function, the uninformative vote ranks, rather than its margins.
    """

    def log_loss(log_t: float) -> float:
        return float(-np.log(probabilities(np.exp(log_t))[np.arange(len(codes)), codes] + 1e-300).mean())

    return float(np.exp(minimize_scalar(log_loss, bounds=(-8.0, 8.0), method="bounded").x))


def choose_kinds(
    names: str | Sequence[str], n_fit: int, max_exact: int = MAX_EXACT, pca: int | None = None
) -> list[str]:
    """The kinds to fit for `names` (kinds or `all`, in the order given, without repeats) on `n_fit` codes.

    `all` is every kind that suits the size: up to `max_exact` training codes the four exact kinds
    (sgd, a streaming approximation of the linear ones, adds nothing there), above it logreg and sgd
    (logreg alone with `pca`: sgd streams the codes, PCA needs them in memory), with one line naming
    what it left out. A kind asked for by name runs at any size, with a warning: never an hours-long
    silent fit. Checked before anything is fitted, so a refused kind leaves no half-done run.
    """
    names = [names] if isinstance(names, str) else list(names)  # "logreg" is one kind, not six letters
    if not names:
        raise CnnCodesError(f"no classifier given: use one or more of {', '.join(KINDS)}, or all")
    large = n_fit > max_exact
    scalable = tuple(k for k in _SCALABLE if not (pca and k == "sgd"))
    kinds: list[str] = []
    for name in names:
        for kind in (scalable if large else _EXACT) if name == "all" else [name]:
            if kind not in KINDS:
                raise CnnCodesError(f"unknown classifier {kind!r}: use one of {', '.join(KINDS)} or all")
            if kind not in kinds:
                kinds.append(kind)
    if pca and "sgd" in kinds:
        raise CnnCodesError(_SGD_WITH_PCA)
    if large:
        size = f"{n_fit:,} training codes (above {max_exact:,})"
        if "all" in names and (left := [k for k in (*_QUADRATIC, "sgd") if k not in kinds]):
            instead = "logreg only (sgd streams the codes, --pca needs them in memory)" if pca else "sgd fitted instead"
            warn(f"all: {', '.join(left)} left out on {size}, where they would take hours; {instead}")
        for kind in (k for k in _QUADRATIC if k in kinds):
            warn(f"{kind} may take hours on {size}: --classifier sgd scales to any size")
    return kinds


def _check_training_classes(feats: Features, subsets: np.ndarray) -> None:
    """Every class needs two training images: a class with none could never be predicted, yet would be scored.

    It happens when a class's images are near-duplicates of another class's (their group goes where its
    first image's class puts it) or when a class has two images, one of them in test.
    """
    counts = np.bincount(feats.y[subsets != "test"], minlength=len(feats.classes))
    short = [f"{c!r} ({n})" for c, n in zip(feats.classes, counts.tolist()) if n < 2]
    if short:
        raise CnnCodesError(
            f"every class needs at least 2 training images (train+val); {', '.join(short)} "
            f"{'has' if len(short) == 1 else 'have'} fewer: add distinct images, or remove the folder, then "
            "extract again"
        )


def fit_svm(
    features: Path | str,
    out: Path | str,
    *,
    classifiers: str | Sequence[str] = ("all",),
    normalize: str = "auto",
    pca: int | None = None,
    cv: int = 5,
    class_weight: str | None = None,
    n_jobs: int | None = -1,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
    repeats: int = 1,
    max_exact: int = MAX_EXACT,
) -> list[dict[str, Any]]:
    """Fit each classifier on the train (and val) codes, score it once on the test codes, save it.

    Writes `<run>.joblib` (the fitted model, class names and the extractor spec) and
    `<run>.json` (the run record) per classifier into `out`; returns the records. With
    `repeats` K > 1 the same images are split again K-1 times (seeds after the features' own,
    duplicate groups kept together), each split fitted and scored on its own; the record adds
    the per-split accuracies, their mean and standard deviation. The bundle is the first split's.

    Args:
        features: a folder written by `extract`.
        out: the models folder.
        classifiers: `linear-svm`, `logreg`, `rbf-svm`, `knn`, `sgd` or `all` (repeatable; see `choose_kinds`).
        normalize: `auto` (standard, l2 and none, chosen by cross-validation), `standard`, `l2` or `none`.
        pca: reduce the codes to this many principal components first.
        cv: folds of group-aware cross-validation on train+val; 0 chooses on the val subset.
        class_weight: `balanced` for imbalanced classes.
        n_jobs: parallel jobs of the search (-1: all cores).
        seed: the folds' seed.
        name: prefix of the run names.
        progress: a rich progress bar.
        repeats: splits to score on (see above).
        max_exact: training codes above which `all` fits logreg and sgd only (a kind named anyway warns),
            and training rows (images times views) above which models train on the codes, not every view.
    """
    feats = load_features(features)
    n_fit = int((feats.subsets != "test").sum())
    kinds = choose_kinds(classifiers, n_fit, max_exact, pca)
    if feats.views is not None and n_fit * feats.views.shape[1] > max_exact:
        feats = replace(feats, views=None)  # as many rows as `all` leaves the quadratic kinds out for: the codes
    if normalize not in NORMALIZERS:
        raise CnnCodesError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZERS)}")
    if repeats < 1:
        raise CnnCodesError(f"--repeats must be at least 1 (got {repeats})")
    splits = feats.repeated_splits(repeats)
    if any(not (subsets == "test").any() for _, subsets in splits):
        raise CnnCodesError(f"{feats.path} has no test images: extract again with a --split that keeps a test share")
    for _, subsets in splits:
        _check_training_classes(feats, subsets)
    out = Path(out)
    origin = {  # what the run is made of; not where the features folder is (moved, it holds the same codes)
        "codes_fingerprint": feats.meta.get("run_key"),  # the images' identities, the extractor and the split
        "extractor": feats.meta["extractor"],
        "split_fingerprint": feats.split_fingerprint,
        "normalize": normalize,
        "pca": pca,
        "class_weight": class_weight,
    }
    runs = {run_name(name, feats.spec.backbone, feats.spec.layer, kind): kind for kind in kinds}
    make_folder(out)
    for run in runs:  # all refused before any is fitted
        refuse_to_replace(out / f"{run}.joblib", origin)
    records: list[dict[str, Any]] = []
    with progress_bar("Fitting classifiers", len(kinds) * repeats, unit="model", enabled=progress) as advance:
        try:
            for run, kind in runs.items():

                def make(fit_subsets: np.ndarray, kind: str = kind) -> CodesClassifier:
                    return CodesClassifier(
                        kind, normalize, pca, class_weight, _selection_splitter(fit_subsets, cv), n_jobs, seed
                    )

                records.append(_fit_one(feats, out, run, kind, splits, make, origin, advance))
        except KeyboardInterrupt as e:  # each run is saved when fitted: say which are, for the CLI's last line
            if records:
                e.add_note(f"{', '.join(r['run'] for r in records)} saved in {out}; the others were not fitted.")
            raise
    _warn_if_reduced(records[0]["params"], cv, pca)
    return records


def _warn_if_reduced(used: dict[str, Any], cv: int, pca: int | None) -> None:
    """Say so when the data allowed fewer folds or components than asked for (the records hold what was used)."""
    if cv and used["cv"] < cv:
        warn(f"--cv {cv}: {used['cv']} folds used, as many as the smallest class and the duplicate groups allow")
    if pca and used["pca"] is not None and used["pca"] < pca:
        warn(f"--pca {pca}: {used['pca']} components used, as many as the codes' length and CV folds allow")


def _selection_splitter(subsets: np.ndarray, cv: int):
    """Folds of the train+val codes, or with `cv=0` the val subset as the one held-out fold."""
    if cv < 0 or cv == 1:
        raise CnnCodesError(f"--cv must be 0 (choose on the val subset) or at least 2 folds (got {cv})")
    if cv:
        return cv
    if not (subsets == "val").any():
        raise CnnCodesError("--cv 0 chooses hyper-parameters on the val subset, but there is none: use --cv 5")
    return PredefinedSplit(np.where(subsets == "val", 0, -1))


def _fit_split(feats: Features, subsets: np.ndarray, make) -> tuple[CodesClassifier, np.ndarray, float]:
    """A model chosen and fitted on one split's train+val, and its probabilities on that split's test images."""
    fit_rows = subsets != "test"
    model = make(subsets[fit_rows])
    started = time.perf_counter()
    try:
        model.fit_rows(feats.X, feats.y, np.flatnonzero(fit_rows), groups=feats.groups, views=feats.views)
    except ValueError as e:
        raise CnnCodesError(str(e)) from None
    seconds = time.perf_counter() - started
    test = np.flatnonzero(subsets == "test")  # scored a chunk at a time: the codes may not fit in memory
    parts = [class_probabilities(model, feats.X[chunk], len(feats.classes)) for chunk in _chunks(test, SGD_CHUNK)]
    return model, np.vstack(parts), seconds


def _fit_one(
    feats: Features, out: Path, run: str, kind: str, splits, make, origin: dict[str, Any], advance
) -> dict[str, Any]:
    spec = feats.spec
    (first_seed, subsets), *others = splits
    model, proba, fit_seconds = _fit_split(feats, subsets, make)
    advance(1)
    test_rows = subsets == "test"
    repeats = [repeat_score(first_seed, feats.y[test_rows], proba)]
    for seed, other in others:
        repeats.append(repeat_score(seed, feats.y[other == "test"], _fit_split(feats, other, make)[1]))
        advance(1)
    record = build_record(
        run=run,
        method="cnn-codes",
        backbone=spec.backbone,
        layer=spec.layer,
        classifier=kind,
        params={
            **model.best_params_,
            "pca": model.n_components_,
            "views": model.n_views_,
            "class_weight": model.class_weight,
            "cv": model.n_folds_ if isinstance(model.cv, int) else "val",
            "temperature": round(model.temperature_, 4),
        },
        cv_score=model.cv_score_,
        grid_edges=model.grid_edges_,
        origin=origin,
        dataset={
            "data": feats.meta["data"],
            "features": str(feats.path.resolve()),
            "split_fingerprint": feats.split_fingerprint,
        },
        classes=feats.classes,
        n_train=int((~test_rows).sum()),
        n_test=int(test_rows.sum()),
        **score(feats.y[test_rows], proba, feats.classes),
        **(repeats_summary(repeats) if others else {}),
        fit_seconds=round(fit_seconds, 3),
        extract_seconds=feats.meta["elapsed_seconds"],
        test_predictions=per_image_predictions(
            [p for p, t in zip(feats.paths, test_rows) if t], feats.y[test_rows], proba, feats.classes
        ),
    )
    return publish_bundle(
        out / f"{run}.joblib",
        {"run": run, "model": model, "classes": feats.classes, "extractor": feats.meta["extractor"]},
        record,
    )


def class_probabilities(model: CodesClassifier, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes, with zeros for classes the model never saw in training."""
    proba = np.zeros((len(X), n_classes), dtype=np.float64)
    proba[:, model.classes_] = model.predict_proba(X)
    return proba
