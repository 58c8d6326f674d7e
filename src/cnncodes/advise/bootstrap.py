"""Is a candidate really better than the default? A paired bootstrap over images.

Both settings are scored on the same images, so the comparison is paired: per image the
difference of correctness is +1 (only the candidate right), -1 (only the default right)
or 0. Resampling images with replacement and averaging these differences gives the
spread of the accuracy gain that another draw of images of the same kind would show;
a candidate is recommended only when the whole 95 % interval is above zero.

A resample's mean depends only on how many +1 and -1 images it draws, so the resamples
are drawn as multinomial counts over those three kinds: the same distribution as
resampling image indices, in memory independent of n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncodes.core.errors import CnnCodesError


@dataclass(frozen=True)
class PairedDifference:
    """The accuracy gain of a candidate over the default, with its bootstrap interval.

    Attributes:
        mean: observed accuracy of the candidate minus that of the default.
        low: lower end of the percentile interval.
        high: upper end of the percentile interval.
        confidence: the interval's coverage, e.g. 0.95.
    """

    mean: float
    low: float
    high: float
    confidence: float


def paired_bootstrap(
    *,
    candidate: np.ndarray,
    default: np.ndarray,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The candidate's accuracy minus the default's, and a percentile interval from resampled images.

    Args:
        candidate: (n,) 0/1 (or bool) correctness of the candidate per image.
        default: (n,) correctness of the default setting on the same images, same order.
        resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seeds the resampling, so the interval can be reproduced.

    Returns:
        The observed difference and its interval.

    Raises:
        CnnCodesError: vectors of different lengths, empty, or not 0/1.
    """
    ours, theirs = np.asarray(candidate), np.asarray(default)
    if ours.shape != theirs.shape or ours.ndim != 1 or not len(ours):
        raise CnnCodesError(
            f"correctness vectors of shapes {ours.shape} and {theirs.shape}: give one 0/1 per image in each."
        )
    if not (np.isin(ours, (0, 1)).all() and np.isin(theirs, (0, 1)).all()):
        raise CnnCodesError("correctness vectors must hold only 0 and 1 (or False and True).")
    difference = ours.astype(np.int64) - theirs.astype(np.int64)
    n = len(difference)
    shares = np.array([(difference == 1).sum(), (difference == -1).sum(), (difference == 0).sum()]) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=resamples)
    means = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(mean=float(difference.mean()), low=float(low), high=float(high), confidence=confidence)


def recommended(difference: PairedDifference) -> bool:
    """Whether to recommend the candidate over the default: its interval lies wholly above zero.

    An interval that contains zero means the images cannot tell the two apart, and the
    default then wins by being the default (and by not having been selected among many).

    Args:
        difference: the bootstrap of candidate minus default.

    Returns:
        True when the lower end of the interval is above zero.
    """
    return difference.low > 0.0
