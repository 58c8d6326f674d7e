"""The `sgd` classifier, which streams codes larger than memory, and `all` leaving out kinds that cannot scale."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_blobs

import cnncodes
from cnncodes.classify.estimator import CodesClassifier
from cnncodes.classify.fit import fit_classifiers
from cnncodes.codes.features import load_features
from cnncodes.core.errors import CnnCodesError, CnnCodesWarning

from .helpers import cli, fast_spec, make_dataset


class CountingCodes:
    """Codes that remember the most rows any one read asked for: the memory a streaming fit needs."""

    def __init__(self, X: np.ndarray):
        self.X, self.shape, self.most_rows = X, X.shape, 0

    def __getitem__(self, rows):
        found = self.X[rows]
        self.most_rows = max(self.most_rows, len(found))
        return found


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sgd")
    data = make_dataset(root / "data", per_class=10)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    return root / "features"


def blobs(n: int = 900) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n, n_features=64, centers=4, cluster_std=6.0, random_state=1)
    return X.astype(np.float32), y


def test_sgd_is_as_accurate_as_logistic_regression_on_separable_codes():
    X, y = blobs()
    scores = {
        kind: CodesClassifier(kind=kind, cv=3).fit(X[:600], y[:600]).score(X[600:], y[600:])
        for kind in ("sgd", "logreg")
    }
    assert scores["sgd"] >= 0.9
    assert scores["sgd"] >= scores["logreg"] - 0.03


def test_sgd_reads_one_chunk_of_codes_at_a_time():
    X, y = blobs()
    codes = CountingCodes(X)
    rows = np.arange(0, 900, 2)
    model = CodesClassifier(kind="sgd", cv=3, chunk_size=150).fit_rows(codes, y, rows)
    assert codes.most_rows == 150
    assert model.score(X[1::2], y[1::2]) >= 0.9
    proba = model.predict_proba(X[1::2])
    assert np.allclose(proba.sum(axis=1), 1)
    assert (model.classes_[proba.argmax(axis=1)] == model.predict(X[1::2])).all()


def test_features_stay_memory_mapped(features):
    X = load_features(features).X
    assert not X.flags.owndata and isinstance(X.base, np.memmap)


def test_sgd_bundle_predicts_with_the_cli(features, tmp_path):
    fitted = cli("fit-svm", features, "--out", tmp_path, "--classifier", "sgd", "--cv", "3")
    assert fitted.exit_code == 0, fitted.output
    assert "loss=" in fitted.stdout and "alpha=" in fitted.stdout
    model = tmp_path / "vgg16-block5_pool-sgd.joblib"
    record = json.loads(model.with_suffix(".json").read_text())
    assert record["classifier"] == "sgd" and record["params"]["loss"] in ("hinge", "log_loss")
    assert record["params"]["temperature"] > 0 and record["ece"] is not None
    data = json.loads((features / "meta.json").read_text())["data"]
    images = [str(Path(data) / p["path"]) for p in record["test_predictions"]]
    predicted = cli("predict", model, *images, "--format", "json", "--quiet")
    assert predicted.exit_code == 0, predicted.output
    answers = json.loads(predicted.stdout)
    assert [a["label"] for a in answers] == [p["predicted"] for p in record["test_predictions"]]


def test_all_fits_the_exact_kinds_below_the_size_limit_and_logreg_and_sgd_above(features, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CnnCodesWarning)
        small = fit_classifiers(features, out=tmp_path / "small", classifiers=["all"], cv=3, progress=False)
    assert [r["classifier"] for r in small] == ["linear-svm", "logreg", "rbf-svm", "knn"]
    with pytest.warns(CnnCodesWarning) as caught:
        large = fit_classifiers(
            features, out=tmp_path / "large", classifiers=["all", "knn"], cv=3, max_exact=10, progress=False
        )
    assert [r["classifier"] for r in large] == ["logreg", "sgd", "knn"]
    warned = " ".join(" ".join(str(w.message) for w in caught).split())
    assert "all: linear-svm, rbf-svm left out on" in warned and "sgd fitted instead" in warned
    assert (
        "knn may take hours on" in warned and "classifiers sgd scales to any size" in warned
    )  # a parameter, for Python callers


def test_pca_above_the_size_limit_fits_logreg_alone_and_sgd_with_pca_is_refused_before_any_fit(features, tmp_path):
    with pytest.warns(CnnCodesWarning) as caught:
        records = fit_classifiers(
            features, out=tmp_path / "pca", classifiers=["all"], cv=3, pca=4, max_exact=10, progress=False
        )
    assert [r["classifier"] for r in records] == ["logreg"]
    warned = " ".join(" ".join(str(w.message) for w in caught).split())
    assert "all: linear-svm, rbf-svm, knn, sgd left out on" in warned and "logreg only" in warned
    with pytest.raises(CnnCodesError, match="pca needs the codes in memory"):
        fit_classifiers(features, out=tmp_path / "refused", classifiers=["logreg", "sgd"], cv=3, pca=4, progress=False)
    assert not (tmp_path / "refused").exists()
