"""Classical classifiers on CNN codes, as one small scikit-learn estimator.

`CodesClassifier(kind=...)` is normalisation, optional PCA and a linear SVM, logistic
regression, RBF SVM or k-NN, with hyper-parameters chosen by cross-validation. Every kind
gives probabilities: SVMs through temperature scaling of their decision scores
(`CalibratedClassifierCV(method="temperature")`), which is a softmax of the scores and so
never changes which class wins.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted, validate_data

from .bundle import publish_bundle
from .choices import KINDS, NORMALIZERS
from .errors import CnnCodesError
from .evaluate import per_image_predictions, score
from .features import Features, load_features
from .progress import progress_bar
from .records import build_record, refuse_to_replace, run_name

_CALIBRATED = {"linear-svm", "rbf-svm"}
_LINEAR = {"linear-svm", "logreg"}


def _estimator(kind: str, class_weight: str | None) -> tuple[Any, dict[str, list]]:
    """The estimator of a kind and its search grid, set for standardised codes (see `CodesClassifier._grid`)."""
    if kind == "linear-svm":
        # libsvm's linear kernel: on a few thousand codes it fits in a fraction of a second,
        # where liblinear's LinearSVC needs minutes for large C on standardised codes.
        return SVC(kernel="linear", class_weight=class_weight), {"C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}
    if kind == "logreg":
        return LogisticRegression(class_weight=class_weight, max_iter=3000), {"C": [1e-2, 1e-1, 1.0, 10.0, 100.0]}
    if kind == "rbf-svm":
        return SVC(kernel="rbf", class_weight=class_weight), {"C": [1.0, 10.0, 100.0], "gamma": [0.25, 1.0, 4.0]}
    if kind == "knn":
        return KNeighborsClassifier(weights="distance"), {"n_neighbors": [1, 3, 5, 9, 15]}
    raise CnnCodesError(f"unknown classifier {kind!r}: use one of {', '.join(KINDS)}")


def _normalizer(normalize: str):
    if normalize == "standard":
        return StandardScaler()
    if normalize == "l2":
        return Normalizer()
    if normalize == "none":
        return FunctionTransformer()
    raise CnnCodesError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZERS)}")


class CodesClassifier(ClassifierMixin, BaseEstimator):
    """A classifier of CNN codes whose hyper-parameters are chosen by cross-validation.

    `cv` is a number of stratified folds or any scikit-learn splitter (e.g. a
    `PredefinedSplit` that scores on a validation subset). After `fit`, `best_params_`
    holds the chosen values and `cv_score_` their cross-validated score.
    """

    def __init__(self, kind: str = "linear-svm", normalize: str = "standard", pca: int | None = None,
                 class_weight: str | None = None, cv: Any = 5, n_jobs: int | None = -1, random_state: int = 0):
        self.kind = kind
        self.normalize = normalize
        self.pca = pca
        self.class_weight = class_weight
        self.cv = cv
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise CnnCodesError("training needs images of at least two classes")
        if self.class_weight not in (None, "balanced"):
            raise CnnCodesError(f"class_weight takes 'balanced' or None (got {self.class_weight!r})")
        if self.n_jobs == 0:
            raise CnnCodesError("n_jobs must not be 0: use -1 for all cores or a positive number")
        smallest = int(np.bincount(np.searchsorted(self.classes_, y)).min())
        if smallest < 2:
            raise CnnCodesError("every class needs at least 2 training images (train+val) to choose hyper-parameters "
                                "and calibrate probabilities: add images to the smallest class")
        estimator, grid = _estimator(self.kind, self.class_weight)
        splitter = self._splitter(smallest)
        calibration = StratifiedKFold(n_splits=min(3, smallest), shuffle=True, random_state=self.random_state)
        fold = min(_smallest_training_fold(s, X, y) for s in (splitter, calibration))
        steps = [("normalize", _normalizer(self.normalize))]
        if self.pca:  # every CV fold must be able to fit that many components
            steps.append(("pca", PCA(n_components=min(self.pca, fold - 1, X.shape[1]), random_state=self.random_state)))
        pipeline = Pipeline([*steps, ("model", estimator)])
        search = GridSearchCV(pipeline, self._grid(grid, X, fold, steps), cv=splitter, n_jobs=self.n_jobs,
                              scoring="balanced_accuracy" if self.class_weight else "accuracy", refit=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(X, y)
            self.best_params_ = {k.removeprefix("model__"): v for k, v in search.best_params_.items()}
            self.cv_score_ = float(search.best_score_)
            self.model_ = self._with_probabilities(search.best_estimator_, X, y, calibration)
        return self

    def _grid(self, grid: dict[str, list], X: np.ndarray, fold: int, steps: list) -> dict[str, list]:
        """The grid moved to the spread of the codes the model sees (after normalisation and PCA).

        The grids suit standardised codes, whose total variance is their length. Scaling codes
        by s is the same problem as scaling a linear model's C by 1/s² (the intercept takes the
        mean), and `gamma` is relative to 1/(total variance), scikit-learn's "scale": so
        `--normalize l2` or `none`, and PCA, search the same effective range.
        """
        grid = dict(grid)
        if "gamma" in grid or self.kind in _LINEAR:
            seen = Pipeline([(name, clone(step)) for name, step in steps]).fit_transform(X)
            spread = float(seen.var(axis=0).sum()) or 1.0
            if "gamma" in grid:
                grid["gamma"] = [g / spread for g in grid["gamma"]]
            if self.kind in _LINEAR:
                grid["C"] = [c * seen.shape[1] / spread for c in grid["C"]]
        if "n_neighbors" in grid:  # k-NN needs at least k training codes in every fold
            grid["n_neighbors"] = [k for k in grid["n_neighbors"] if k <= fold] or [1]
        return {f"model__{k}": v for k, v in grid.items()}

    def _splitter(self, smallest: int):
        if not isinstance(self.cv, int):
            return self.cv
        return StratifiedKFold(n_splits=min(self.cv, smallest), shuffle=True, random_state=self.random_state)

    def _with_probabilities(self, fitted: Pipeline, X: np.ndarray, y: np.ndarray, calibration):
        if self.kind not in _CALIBRATED:
            return fitted
        calibrated = CalibratedClassifierCV(clone(fitted), method="temperature", cv=calibration, ensemble=False)
        return calibrated.fit(X, y)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.model_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def _smallest_training_fold(splitter, X: np.ndarray, y: np.ndarray) -> int:
    return min(len(train) for train, _ in splitter.split(X, y))


def expand_kinds(names: Sequence[str]) -> list[str]:
    """`all` or repeated names, in the order given, without repeats."""
    kinds: list[str] = []
    for name in names:
        for kind in KINDS if name == "all" else [name]:
            if kind not in KINDS:
                raise CnnCodesError(f"unknown classifier {kind!r}: use one of {', '.join(KINDS)} or all")
            if kind not in kinds:
                kinds.append(kind)
    return kinds


def fit_svm(
    features: Path | str,
    out: Path | str,
    *,
    classifiers: Sequence[str] = ("all",),
    normalize: str = "standard",
    pca: int | None = None,
    cv: int = 5,
    class_weight: str | None = None,
    n_jobs: int | None = -1,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fit each classifier on the train (and val) codes, score it once on the test codes, save it.

    Writes `<run>.joblib` (the fitted model, class names and the extractor spec) and
    `<run>.json` (the run record) per classifier into `out`; returns the records.
    """
    feats = load_features(features)
    kinds = expand_kinds(classifiers)
    _normalizer(normalize)  # an unknown name fails here, before any model is fitted
    fit_rows, test_rows = feats.rows("train", "val"), feats.rows("test")
    if not test_rows.any():
        raise CnnCodesError(f"{feats.path} has no test images: extract again with a --split that keeps a test share")
    splitter = _selection_splitter(feats.subsets[fit_rows], cv, seed)
    out = Path(out)
    models = {run_name(name, feats.spec.backbone, feats.spec.layer, kind):
              CodesClassifier(kind, normalize, pca, class_weight, splitter, n_jobs, seed) for kind in kinds}
    for run, model in models.items():  # all refused before any is fitted
        refuse_to_replace(out / f"{run}.joblib", _origin(feats, model))
    records = []
    with progress_bar("Fitting classifiers", len(kinds), unit="model", enabled=progress) as advance:
        for (run, model), kind in zip(models.items(), kinds):
            records.append(_fit_one(feats, out, run, kind, fit_rows, test_rows, model))
            advance(1)
    return records


def _selection_splitter(subsets: np.ndarray, cv: int, seed: int):
    """Folds of the train+val codes, or with `cv=0` the val subset as the one held-out fold."""
    if cv < 0 or cv == 1:
        raise CnnCodesError(f"--cv must be 0 (choose on the val subset) or at least 2 folds (got {cv})")
    if cv:
        return cv
    if not (subsets == "val").any():
        raise CnnCodesError("--cv 0 chooses hyper-parameters on the val subset, but there is none: use --cv 5")
    return PredefinedSplit(np.where(subsets == "val", 0, -1))


def _origin(feats: Features, model: CodesClassifier) -> dict[str, Any]:
    """What a run's meaning depends on: a run of the same name with another origin is never replaced."""
    return {"features": str(feats.path.resolve()), "extractor": feats.meta["extractor"],
            "split_fingerprint": feats.split_fingerprint, "normalize": model.normalize, "pca": model.pca,
            "class_weight": model.class_weight}


def _fit_one(feats: Features, out: Path, run: str, kind: str, fit_rows, test_rows, model: CodesClassifier
             ) -> dict[str, Any]:
    spec = feats.spec
    started = time.perf_counter()
    model.fit(feats.X[fit_rows], feats.y[fit_rows])
    fit_seconds = time.perf_counter() - started
    proba = class_probabilities(model, feats.X[test_rows], len(feats.classes))
    record = build_record(
        run=run, method="cnn-codes", backbone=spec.backbone, layer=spec.layer, classifier=kind,
        params={**model.best_params_, "normalize": model.normalize, "pca": model.pca,
                "class_weight": model.class_weight, "cv": model.cv if isinstance(model.cv, int) else "val"},
        cv_score=model.cv_score_, origin=_origin(feats, model),
        dataset={"data": feats.meta["data"], "features": str(feats.path.resolve()),
                 "split_fingerprint": feats.split_fingerprint},
        classes=feats.classes, n_train=int(fit_rows.sum()), n_test=int(test_rows.sum()),
        **score(feats.y[test_rows], proba, feats.classes),
        fit_seconds=round(fit_seconds, 3), extract_seconds=feats.meta["elapsed_seconds"],
        test_predictions=per_image_predictions([p for p, t in zip(feats.paths, test_rows) if t], feats.y[test_rows],
                                               proba, feats.classes),
    )
    return publish_bundle(out / f"{run}.joblib",
                          {"run": run, "model": model, "classes": feats.classes, "extractor": feats.meta["extractor"]},
                          record)


def class_probabilities(model: CodesClassifier, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all classes, with zeros for classes the model never saw in training."""
    proba = np.zeros((len(X), n_classes), dtype=np.float64)
    proba[:, model.classes_] = model.predict_proba(X)
    return proba
