"""Classical classifiers on CNN codes, as one small scikit-learn estimator.

`CodesClassifier(kind=...)` is normalisation, optional PCA and a linear SVM, logistic
regression, RBF SVM or k-NN, with the normalisation and hyper-parameters chosen by
cross-validation on folds that keep duplicate groups together; or `sgd`, a linear SVM or
logistic regression fitted by SGD on codes read a chunk at a time (data larger than memory).
Its probabilities are calibrated by `cnncodes.classify.calibration`; the predicted label
stays the fitted model's decision: where the probabilities' top class differs from it (a
near tie), the two swap places.

Bundles hold pickled `CodesClassifier` and `WeightedNeighbors` objects: both keep their names here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from cnncodes.classify.calibration import (
    calibrated_probabilities,
    fit_temperature,
    informative_scores,
    out_of_fold_scores,
)
from cnncodes.classify.kinds import estimator_for, held_out_score, normalizer, weighted_accuracy
from cnncodes.classify.streaming import SGD_ALPHAS, SGD_CHUNK, StreamingFit
from cnncodes.core.choices import NORMALIZERS

_LINEAR = {"linear-svm", "logreg"}
# `--normalize auto` searches each of the others with its own grid.
_AUTO = tuple(n for n in NORMALIZERS if n != "auto")
SGD_WITH_PCA = "--pca needs the codes in memory: the sgd classifier streams them, use it without --pca"
_Folds = list[tuple[np.ndarray, np.ndarray]]


class CodesClassifier(ClassifierMixin, BaseEstimator):
    """A classifier of CNN codes whose normalisation and hyper-parameters are chosen by cross-validation.

    After `fit`, `best_params_` holds the chosen values (with `normalize`), `cv_score_` their
    cross-validated score, `temperature_` the calibration of the probabilities, `grid_edges_`
    the parameters chosen at an end of their grid (a hint that the grid is too narrow for these
    codes), `n_folds_` and `n_components_` the folds and PCA components used (small data allows
    fewer than asked for), and `n_views_` the views of each code it was trained on (see `fit`).

    Args:
        kind: one of `KINDS` (cnncodes.core.choices).
        normalize: `auto` (standard, l2 and none, each with its grid), `standard`, `l2` or `none`.
        pca: reduce the codes to this many principal components first (not with `sgd`).
        class_weight: None, `balanced` or a dict by label. Candidates are ranked by accuracy
            weighted the same way (balanced accuracy for `balanced`).
        cv: a number of stratified folds or any scikit-learn splitter (e.g. a `PredefinedSplit`
            that scores on a validation subset).
        n_jobs: parallel candidates of the search (-1: all cores).
        random_state: seed of the folds, PCA and SGD.
        chunk_size: codes `sgd` reads at a time.
    """

    def __init__(
        self,
        *,
        kind: str = "linear-svm",
        normalize: str = "auto",
        pca: int | None = None,
        class_weight: Any = None,
        cv: Any = 5,
        n_jobs: int | None = -1,
        random_state: int = 0,
        chunk_size: int = SGD_CHUNK,
    ):
        self.kind = kind
        self.normalize = normalize
        self.pca = pca
        self.class_weight = class_weight
        self.cv = cv
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.chunk_size = chunk_size

    def fit(self, X, y, groups=None, views=None) -> CodesClassifier:
        """Choose and fit on codes `X`, or on every view of each code.

        Training on each view of an image (e.g. its code at each scale) teaches the model what
        does not change its class; the search scores each candidate on the held-out images'
        codes X, as the model will be used, and folds keep an image's views together. `sgd`
        streams X alone.

        Args:
            X: codes, (rows, features).
            y: their labels.
            groups: a duplicate group per row: images of one group stay in one fold.
            views: (rows, views, features), whose mean per row is X; None trains on X.

        Returns:
            The fitted classifier.

        Raises:
            ValueError: bad data or settings (scikit-learn's convention).
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
        self._search(X, codes, every, folds, calibration)
        self.n_folds_ = len(folds)
        self.n_components_ = self.model_.named_steps["pca"].n_components_ if self.pca else None
        return self

    def _search(self, X: np.ndarray, codes: np.ndarray, every: slice, folds: _Folds, calibration: _Folds) -> None:
        """Choose by grid search on `folds`, fit on `X[every]`, and fit the temperature on `calibration` folds."""
        fold = min(len(train) for train, _ in folds + calibration)
        estimator, grid = estimator_for(self.kind, self._code_weights())
        pipeline = Pipeline([("normalize", StandardScaler()), ("pca", "passthrough"), ("model", estimator)])
        grids = self._grids(grid, X[every], fold)
        scoring = partial(held_out_score, self._selection_metric())
        search = GridSearchCV(pipeline, grids, cv=folds, n_jobs=self.n_jobs, refit=False, scoring=scoring)
        # One BLAS thread per fit: the parallelism is across candidates (n_jobs), and small fits on a
        # busy machine spend more time waking idle BLAS threads than computing (measured: 10-100x).
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(X, codes)
            self.model_ = clone(pipeline).set_params(**search.best_params_).fit(X[every], codes[every])
            scores, rows = out_of_fold_scores(self.model_, X, codes, calibration)
            self.temperature_ = fit_temperature(partial(calibrated_probabilities, self.model_, scores), codes[rows])
        self._record_choice(search, grids)

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

        Args:
            X: codes of every image, (images, features); anything indexable by an array of rows.
            y: the label of every image.
            rows: the images to fit on.
            groups: a duplicate group per image (see `fit`).
            views: (images, views, features) or None (see `fit`).

        Returns:
            The fitted classifier.

        Raises:
            ValueError: bad data or settings.
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

        The temperature is fitted like the other kinds', on out-of-fold scores of 3 group-aware folds:
        one held-out fold is often predicted without a mistake, which drives the temperature to zero.
        """
        smallest = int(np.bincount(codes).min())
        folds = self._folds(rows, codes, groups, smallest, self.cv)
        fit = StreamingFit(X, len(self.classes_), self._code_weights(), self.chunk_size, self.random_state)
        scalers = {name: normalizer(name) for name in self._normalizations()}
        best, (normalize, loss, alpha) = fit.choose(rows, codes, folds[0], scalers, self._selection_metric())
        self.model_ = fit.fitted(rows, codes, scalers[normalize], loss, alpha)
        out_of_fold = np.zeros((len(rows), len(self.classes_)))
        for part, rest in self._folds(rows, codes, groups, smallest, 3):
            model = fit.fitted(rows[part], codes[part], scalers[normalize], loss, alpha)
            out_of_fold[rest] = fit.scores(model, rows[rest])
        self.temperature_ = fit_temperature(partial(calibrated_probabilities, self.model_, out_of_fold), codes)
        self.best_params_ = {"normalize": normalize, "loss": loss, "alpha": alpha}
        self.cv_score_ = float(best)
        self.n_folds_, self.n_components_, self.n_views_ = len(folds), None, 1
        self.grid_edges_ = ["alpha"] if alpha in (min(SGD_ALPHAS), max(SGD_ALPHAS)) else []
        return self

    def _code_weights(self) -> Any:
        """The class weights by class code: a dict names classes by label; the models see their codes."""
        if isinstance(self.class_weight, dict):
            return {code: self.class_weight.get(label, 1.0) for code, label in enumerate(self.classes_)}
        return self.class_weight

    def _selection_metric(self) -> Callable[[np.ndarray, np.ndarray], float]:
        """How candidates are ranked on held-out codes: each image counts as much as the loss counts its class.

        Without weights that is accuracy, with `balanced` balanced accuracy, with a dict accuracy
        weighted by it. Unweighted accuracy (or balanced, for a dict) would rank candidates by costs
        other than the user's, and prefer one on which the weights cannot act: 1-NN, whose single
        vote has no rival to be weighed against, ignores {0: 1000, 1: 1e-4} altogether.
        """
        if self.class_weight is None:
            return accuracy_score
        if isinstance(self.class_weight, dict):
            weights = self._code_weights()
            return partial(weighted_accuracy, weights=np.array([weights[c] for c in range(len(self.classes_))]))
        return balanced_accuracy_score

    def _check_settings(self, codes: np.ndarray) -> None:
        """scikit-learn's ValueErrors for bad data or settings (`fit_classifiers` turns them into one-line errors)."""
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
            normalizer(self.normalize)
        if self.kind == "sgd" and self.pca:
            raise ValueError(SGD_WITH_PCA)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {self.chunk_size})")

    def _folds(self, X, codes, groups, smallest: int, cv: Any) -> _Folds:
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
            steps: list[tuple[str, Any]] = [("normalize", normalizer(name))]
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
        X = validate_data(self, X, dtype=np.float64, reset=False)  # see `informative_scores`
        decision = self.model_.predict(X)
        scores = informative_scores(self.model_, X, len(self.classes_))
        proba = calibrated_probabilities(self.model_, scores, self.temperature_)
        rows = np.nonzero(proba.argmax(axis=1) != decision)[0]
        top = proba[rows].argmax(axis=1)
        proba[rows, top], proba[rows, decision[rows]] = proba[rows, decision[rows]], proba[rows, top]
        return decision, proba

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated class probabilities, whose top class is always `predict`'s.

        Args:
            X: codes, (rows, features).

        Returns:
            (rows, classes) probabilities in the order of `classes_`.
        """
        return self._decide(X)[1]

    def predict(self, X) -> np.ndarray:
        """The fitted model's decision for each code.

        Args:
            X: codes, (rows, features).

        Returns:
            A label per row.
        """
        decision, _ = self._decide(X)
        return self.classes_[decision]
