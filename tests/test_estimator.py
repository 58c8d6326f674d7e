"""`CodesClassifier` held to scikit-learn's whole estimator check suite, for every kind."""

from __future__ import annotations

import pytest
from sklearn.utils.estimator_checks import check_estimator

from cnncodes.classify.estimator import CodesClassifier
from cnncodes.core.choices import KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_codes_classifier_passes_scikit_learns_checks(kind):
    # One normalisation and two folds keep the checks' hundreds of small fits quick; they test behaviour.
    # Checks scikit-learn cannot run here (pandas, array API) are reported as warnings, not passed.
    results = check_estimator(CodesClassifier(kind, normalize="standard", cv=2, n_jobs=1), on_fail=None)
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    assert not failed
    assert sum(r["status"] == "passed" for r in results) >= 50
