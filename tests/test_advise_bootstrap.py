"""The paired bootstrap of `advise`: when a candidate's gain over the default is more than chance."""

from __future__ import annotations

import numpy as np
import pytest

from cnncodes.advise.bootstrap import paired_bootstrap, recommended
from cnncodes.core.errors import CnnCodesError


def test_identical_settings_differ_by_exactly_zero():
    same = np.random.default_rng(0).integers(0, 2, 200)
    difference = paired_bootstrap(candidate=same, default=same)
    assert (difference.mean, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert not recommended(difference)


def test_twenty_more_right_of_200_is_recommended():
    default = np.random.default_rng(1).integers(0, 2, 200).astype(bool)
    candidate = default.copy()
    candidate[np.flatnonzero(~default)[:20]] = True
    difference = paired_bootstrap(candidate=candidate, default=default, seed=3)
    assert difference.mean == pytest.approx(0.1)
    assert 0 < difference.low < 0.1 < difference.high
    assert recommended(difference)
    assert not recommended(paired_bootstrap(candidate=default, default=candidate, seed=3))


def test_noise_is_not_recommended_and_the_seed_repeats():
    rng = np.random.default_rng(2)
    candidate, default = rng.random(300) < 0.7, rng.random(300) < 0.7
    difference = paired_bootstrap(candidate=candidate, default=default, seed=5)
    assert difference.low < 0 < difference.high
    assert not recommended(difference)
    assert paired_bootstrap(candidate=candidate, default=default, seed=5) == difference


def test_counts_draw_the_same_interval_as_resampled_images():
    """Drawing how many images gain or lose is resampling images: compare with the textbook bootstrap."""
    rng = np.random.default_rng(4)
    candidate, default = rng.random(250) < 0.8, rng.random(250) < 0.7
    gains = candidate.astype(int) - default.astype(int)
    resampled = gains[rng.integers(0, 250, size=(20_000, 250))].mean(axis=1)
    difference = paired_bootstrap(candidate=candidate, default=default, resamples=20_000, seed=6)
    assert difference.low == pytest.approx(np.quantile(resampled, 0.025), abs=0.006)
    assert difference.high == pytest.approx(np.quantile(resampled, 0.975), abs=0.006)


@pytest.mark.parametrize(
    ("candidate", "default", "message"),
    [([1, 0, 1], [1, 0], "one 0/1 per image"), ([1, 2, 0], [1, 0, 0], "only 0 and 1"), ([], [], "one 0/1")],
)
def test_bad_vectors_are_refused(candidate, default, message):
    with pytest.raises(CnnCodesError, match=message):
        paired_bootstrap(candidate=np.array(candidate), default=np.array(default))
