"""The ridge probes of `advise`: exact leave-one-out and group k-fold from one SVD, against scikit-learn."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier, RidgeClassifierCV
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold, cross_val_predict
from sklearn.preprocessing import StandardScaler

from cnncodes.advise.basis import decompose
from cnncodes.advise.probes import (
    group_kfold_probe,
    groups_by_size,
    logo_outputs,
    logo_probe,
    loo_outputs,
    loo_probe,
    probe,
    sign_targets,
)
from cnncodes.core.errors import CnnCodesError

ALPHAS = tuple(float(a) for a in np.logspace(-2, 3, 9))


def _codes(n: int, d: int, classes: int, seed: int = 0, signal: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Codes whose class shifts a few dimensions, weakly enough that the ridge strength matters."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    centres = rng.normal(size=(classes, d)) * signal
    return rng.normal(size=(n, d)) * rng.uniform(0.2, 3, d) + centres[labels] + 5.0, labels


@pytest.mark.parametrize(("n", "d", "classes"), [(90, 12, 3), (40, 120, 4), (60, 60, 5)])
def test_leave_one_out_matches_ridge_classifier_cv(n, d, classes):
    codes, labels = _codes(n, d, classes)
    oracle = RidgeClassifierCV(alphas=ALPHAS, scoring="accuracy", store_cv_results=True).fit(codes, labels)
    basis = decompose(codes)
    result = loo_probe(basis, labels, alphas=ALPHAS)
    assert basis.rank == min(n - 1, d)
    assert result.alpha == oracle.alpha_
    assert result.accuracy == pytest.approx(oracle.best_score_, abs=1e-12)
    assert len(set(result.accuracies.round(6))) > 1  # the grid matters on these codes
    targets = sign_targets(labels, classes=classes)
    for i, alpha in enumerate(ALPHAS):
        np.testing.assert_allclose(loo_outputs(basis, targets, alpha=alpha), oracle.cv_results_[:, :, i], atol=1e-8)
    assert result.correct.mean() == result.accuracy


@pytest.mark.parametrize(("n", "d"), [(50, 8), (24, 70)])
def test_binary_leave_one_out_outputs_match(n, d):
    """Two classes: scikit-learn fits one ±1 column (its accuracy score is then degenerate), ours its class-1 column."""
    codes, labels = _codes(n, d, 2, seed=3)
    oracle = RidgeClassifierCV(alphas=ALPHAS, store_cv_results=True, scoring="accuracy").fit(codes, labels)
    basis = decompose(codes)
    result = loo_probe(basis, labels, alphas=ALPHAS)
    held_out = oracle.cv_results_.reshape(n, len(ALPHAS))
    for i, alpha in enumerate(ALPHAS):
        ours = loo_outputs(basis, sign_targets(labels, classes=2), alpha=alpha)
        np.testing.assert_allclose(ours[:, 1], held_out[:, i], atol=1e-8)
    np.testing.assert_allclose(result.accuracies, ((held_out > 0) == labels[:, None]).mean(axis=0))


def test_standardised_codes_match_a_standard_scaler():
    codes, labels = _codes(70, 20, 3, seed=5)
    oracle = RidgeClassifierCV(alphas=ALPHAS, scoring="accuracy").fit(StandardScaler().fit_transform(codes), labels)
    result = loo_probe(decompose(codes, standardise=True), labels, alphas=ALPHAS)
    assert (result.alpha, result.accuracy) == (oracle.alpha_, pytest.approx(oracle.best_score_))


def test_train_accuracy_is_the_fit_on_all_images():
    codes, labels = _codes(30, 80, 3, seed=2)
    result = loo_probe(decompose(codes), labels, alphas=ALPHAS)
    refit = RidgeClassifier(alpha=result.alpha).fit(codes, labels)
    assert result.train_accuracy == pytest.approx(refit.score(codes, labels))
    assert result.train_accuracy > result.accuracy  # n < d: the probe fits its training images better


def _mixed_groups(n: int, seed: int = 0) -> np.ndarray:
    """Group ids with singletons, pairs, triples and one group of five, in shuffled order."""
    sizes = np.resize([1, 2, 1, 3, 5, 2], n)
    ids = np.repeat(np.arange(len(sizes)), sizes)[:n]
    return np.random.default_rng(seed).permutation(ids)


@pytest.mark.parametrize(("n", "d"), [(60, 10), (30, 70)])
def test_leave_one_group_out_matches_refits_without_each_group(n, d):
    codes, labels = _codes(n, d, 3, seed=6)
    groups = _mixed_groups(n)
    basis, targets = decompose(codes), sign_targets(labels, classes=3)
    members = groups_by_size(groups)
    assert sorted(np.concatenate([rows.ravel() for rows in members])) == list(range(n))
    for alpha in ALPHAS[::4]:
        refits = cross_val_predict(
            RidgeClassifier(alpha=alpha),
            codes,
            labels,
            groups=groups,
            cv=LeaveOneGroupOut(),
            method="decision_function",
        )
        np.testing.assert_allclose(logo_outputs(basis, targets, members=members, alpha=alpha), refits, atol=1e-8)
    result = logo_probe(basis, labels, groups=groups, alphas=ALPHAS)
    assert result.scheme == "leave-one-group-out"
    assert result.accuracy == result.accuracies.max()


def test_leave_one_group_out_of_single_images_is_leave_one_out():
    codes, labels = _codes(40, 12, 2, seed=8)
    singles = logo_probe(decompose(codes), labels, groups=np.arange(40)[::-1], alphas=ALPHAS)
    loo = loo_probe(decompose(codes), labels, alphas=ALPHAS)
    np.testing.assert_allclose(singles.accuracies, loo.accuracies)


@pytest.mark.parametrize(("n", "d"), [(80, 10), (36, 90)])
def test_group_kfold_matches_refits_on_each_fold(n, d):
    codes, labels = _codes(n, d, 3, seed=4)
    groups = np.arange(n) // 3
    result = group_kfold_probe(decompose(codes), labels, groups=groups, alphas=ALPHAS, folds=4, seed=7)
    folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=7)
    for alpha, accuracy in zip(ALPHAS, result.accuracies):
        predicted = cross_val_predict(RidgeClassifier(alpha=alpha), codes, labels, groups=groups, cv=folds)
        assert accuracy == pytest.approx((predicted == labels).mean())
        if alpha == result.alpha:
            np.testing.assert_array_equal(result.predictions, predicted)
    assert result.scheme == "group k-fold"


def test_near_duplicates_fool_leave_one_out_but_not_group_kfold():
    """Random labels, every image twice: its copy answers for it unless the pair is held out together."""
    rng = np.random.default_rng(0)
    originals, labels = rng.normal(size=(60, 200)), rng.integers(0, 2, 60)
    codes = np.concatenate([originals, originals + rng.normal(scale=1e-3, size=originals.shape)])
    labels, groups = np.concatenate([labels, labels]), np.concatenate([np.arange(60), np.arange(60)])
    basis = decompose(codes)
    fooled = probe(basis, labels, alphas=(0.01,))
    honest = probe(basis, labels, groups=groups, alphas=(0.01,))
    assert (fooled.scheme, honest.scheme) == ("leave-one-out", "leave-one-group-out")
    assert fooled.accuracy > 0.95
    assert honest.accuracy < 0.7
    assert probe(basis, labels, groups=np.arange(120), alphas=(0.01,)).scheme == "leave-one-out"


def test_memory_stays_linear_in_images():
    """20,000 images: an n×n matrix would be 3.2 GB; the probe's peak is a few (n, d) arrays."""
    codes, labels = _codes(20_000, 16, 4, seed=1)
    tracemalloc.start()
    result = loo_probe(decompose(codes), labels, alphas=ALPHAS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * codes.nbytes
    assert result.accuracy > 0.5


@pytest.mark.parametrize(
    ("labels", "message"),
    [(np.zeros(6, dtype=int), "at least 2 classes"), (np.array([0, 0, 0, 1, 1, 2]), "class 2 has fewer than 2")],
)
def test_too_few_images_or_classes_is_one_line(labels, message):
    with pytest.raises(CnnCodesError, match=message):
        loo_probe(decompose(np.random.default_rng(0).normal(size=(6, 4))), labels)


def test_bad_strengths_and_folds_are_refused():
    codes, labels = _codes(20, 5, 2)
    basis = decompose(codes)
    with pytest.raises(CnnCodesError, match="> 0"):
        loo_probe(basis, labels, alphas=(1.0, 0.0))
    with pytest.raises(CnnCodesError, match="5 folds from 4 groups"):
        group_kfold_probe(basis, labels, groups=np.arange(20) // 5, folds=5)
    with pytest.raises(CnnCodesError, match="19 group ids for 20 images"):
        probe(basis, labels, groups=np.arange(19))
    with pytest.raises(CnnCodesError, match="nothing is left to hold out"):
        probe(basis, labels, groups=np.zeros(20))
