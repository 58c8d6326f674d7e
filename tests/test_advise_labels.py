"""Label issues in `advise`: confident learning in numpy, against cleanlab and on planted flips."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cleanlab.count import compute_confident_joint
from cleanlab.filter import find_label_issues as cleanlab_issues
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import cross_val_predict

from cnncodes.advise.labels import confident_joint, find_label_issues, label_quality
from cnncodes.core.errors import CnnCodesError
from tests.helpers import planted_flips


def _noisy(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of a model that is right more often than not, and labels with 10 % flipped."""
    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(30, 250)), int(rng.integers(2, 7))
    truth = np.arange(n) % classes
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 3)
    logits[np.arange(n), truth] += rng.uniform(0, 4)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = truth.copy()
    flipped = rng.random(n) < 0.1
    labels[flipped] = rng.integers(0, classes, flipped.sum())
    return labels, probabilities


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rank_by", ["self_confidence", "normalized_margin"])
def test_same_issues_in_the_same_order_as_cleanlab(seed, rank_by):
    labels, probabilities = _noisy(seed)
    np.testing.assert_array_equal(
        confident_joint(labels=labels, probabilities=probabilities),
        compute_confident_joint(labels=labels, pred_probs=probabilities),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cleanlab_issues(
            labels, probabilities, filter_by="prune_by_noise_rate", return_indices_ranked_by=rank_by, n_jobs=1
        )
    issues = find_label_issues(labels=labels, probabilities=probabilities, rank_by=rank_by)
    np.testing.assert_array_equal(issues.indices, expected)
    np.testing.assert_array_equal(issues.given, labels[expected])
    assert np.all(np.diff(issues.quality) >= 0)


def test_planted_flips_are_found_from_out_of_fold_probabilities():
    """5 % of labels moved to another class on well-separated Gaussian classes: most are flagged, few others.

    The probabilities come from a linear discriminant, fit in closed form, so the test is fast.
    """
    codes, labels, truth, moved = planted_flips(0, n=600, classes=4, dims=16, spread=1.5)
    probabilities = cross_val_predict(LinearDiscriminantAnalysis(), codes, labels, cv=5, method="predict_proba")
    issues = find_label_issues(labels=labels, probabilities=probabilities)
    found = np.isin(issues.indices, moved)
    assert found.sum() / len(moved) >= 0.7
    assert found.mean() >= 0.6
    assert np.mean(issues.suggested[found] == truth[issues.indices[found]]) >= 0.9


def test_normalized_margin_sees_the_preferred_class():
    probabilities = np.array([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    quality = label_quality(labels=np.array([0, 0]), probabilities=probabilities, rank_by="normalized_margin")
    np.testing.assert_allclose(quality, [0.5, 0.625])


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        (np.array([0, 3]), np.full((2, 3), 1 / 3), "from 0 to 2"),
        (np.array([0, 1]), np.full((3, 3), 1 / 3), "for 2 labels"),
        (np.array([0.0, 1.0]), np.full((2, 2), 0.5), "class indices"),
    ],
)
def test_bad_inputs_are_refused(labels, probabilities, message):
    with pytest.raises(CnnCodesError, match=message):
        find_label_issues(labels=labels, probabilities=probabilities)


def test_unknown_ranking_is_refused():
    with pytest.raises(CnnCodesError, match="normalized_margin"):
        label_quality(labels=np.array([0, 1]), probabilities=np.full((2, 2), 0.5), rank_by="entropy")  # type: ignore[arg-type]
