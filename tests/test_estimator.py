"""`CodesClassifier` held to scikit-learn's whole estimator check suite, for every kind."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.model_selection import train_test_split
from sklearn.utils.estimator_checks import check_class_weight_classifiers, check_estimator

from cnncodes.classify.estimator import CodesClassifier
from cnncodes.core.choices import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_codes_classifier_passes_scikit_learns_checks(kind):
    # The defaults users get (parallel candidates, each kind's grid), with two folds instead of five: the folds
    # change how long the checks' hundreds of small fits take, not what they check. The search over every
    # normalisation is the same code for every kind: logreg's run checks it, the others search one.
    # Checks scikit-learn cannot run here (pandas, array API) are reported as warnings, not passed.
    normalize = "auto" if kind == "logreg" else "standard"
    results = check_estimator(CodesClassifier(kind=kind, cv=2, normalize=normalize), on_fail=None)
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    assert not failed
    assert sum(r["status"] == "passed" for r in results) >= 50


def test_class_weights_rank_the_candidates_so_a_k_nn_cannot_escape_them():
    # 1-NN ignores class weights (a single vote has none to be weighed against); ranked by balanced
    # accuracy instead of the weighted accuracy, it won on l2-normalised codes of noisy blobs
    X, y = make_blobs(centers=2, random_state=0, cluster_std=20)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.5, random_state=0)
    weights = {0: 1000, 1: 0.0001}
    model = CodesClassifier(kind="knn", normalize="l2", class_weight=weights, cv=2, n_jobs=1).fit(X_train, y_train)
    assert model.best_params_["n_neighbors"] > 1
    assert np.mean(model.predict(X_test) == 0) > 0.87


def test_a_k_nn_with_every_default_weighs_its_classes():
    # The audit's failure: the default search over every normalisation let a k-NN escape the class weights
    check_class_weight_classifiers("CodesClassifier", CodesClassifier(kind="knn", cv=2))


def test_candidates_searched_in_parallel_processes_choose_and_predict_as_in_one():
    # The suite's workers run the default n_jobs=-1 on one core each (tests/conftest.py), which joblib runs in
    # the process itself: here the search really ships the candidates and their scorer to worker processes.
    X, y = make_blobs(n_samples=60, centers=3, n_features=8, cluster_std=4.0, random_state=1)
    for kind in KINDS:
        one, two = (CodesClassifier(kind=kind, cv=3, n_jobs=n, random_state=0).fit(X, y) for n in (1, 2))
        assert one.best_params_ == two.best_params_ and one.cv_score_ == two.cv_score_, kind
        assert np.allclose(one.predict_proba(X), two.predict_proba(X)), kind
