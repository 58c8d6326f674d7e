"""Each candidate measured on the train and val images: held-out probe accuracy, LogME, the gain over the default.

Every measurement of a candidate comes from one SVD of its codes (`basis.decompose`); the
held-out accuracy is exact leave-one-out, or leave-one-group-out when near-duplicates exist,
so an image is never scored by a model that saw its copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cnncodes.advise.basis import decompose
from cnncodes.advise.bootstrap import PairedDifference, paired_bootstrap
from cnncodes.advise.candidates import Candidate
from cnncodes.advise.logme import log_me
from cnncodes.advise.network import TapLayout
from cnncodes.advise.probes import ProbeResult, probe

# Bootstrap resamples of a gain: the tails of a simultaneous interval over a few dozen candidates hold 0.1 % each.
RESAMPLES = 40_000
# The shares of the training images of the learning curve.
CURVE_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Measured:
    """A candidate's measurements.

    Attributes:
        candidate: what was measured.
        dimensions: numbers per code.
        probe: the ridge probe's held-out accuracy over its grid, and per image at the best strength.
        logme: LogME score (higher: the codes explain the labels with less to learn).
        seconds: the time the measurements took.
    """

    candidate: Candidate
    dimensions: int
    probe: ProbeResult
    logme: float
    seconds: float

    @property
    def accuracy(self) -> float:
        """Held-out accuracy of the probe at its chosen strength."""
        return self.probe.accuracy


def measure(codes: np.ndarray, candidate: Candidate, labels: np.ndarray, groups: np.ndarray) -> Measured:
    """Measure one candidate's codes.

    Args:
        codes: (n, d) the candidate's codes of the train and val images.
        candidate: the candidate.
        labels: (n,) their classes.
        groups: (n,) their near-duplicate groups.

    Returns:
        The measurements.
    """
    started = time.perf_counter()
    basis = decompose(codes, standardise=True)
    result = probe(basis, labels, groups=groups)
    score = log_me(basis, labels).score
    return Measured(candidate, codes.shape[1], result, score, time.perf_counter() - started)


def measure_all(
    candidates: Sequence[Candidate],
    rows: dict[str, np.ndarray],
    layouts: dict[str, TapLayout],
    labels: np.ndarray,
    groups: np.ndarray,
    advance: Callable[[int], None] = lambda n: None,
) -> list[Measured]:
    """Measure every candidate on the same images.

    Args:
        candidates: what to measure.
        rows: per backbone, (n, width) rows of its tapped model, the same images in the same order.
        layouts: per backbone, the layout of its rows.
        labels: (n,) the images' classes.
        groups: (n,) their near-duplicate groups.
        advance: called once per candidate measured (a progress bar).

    Returns:
        One measurement per candidate, in the order given.
    """
    found = []
    for candidate in candidates:
        codes = candidate.codes(rows[candidate.backbone], layouts[candidate.backbone])
        found.append(measure(codes, candidate, labels, groups))
        advance(1)
    return found


def simultaneous(comparisons: int, *, level: float = 0.95) -> float:
    """The confidence of each of `comparisons` intervals that hold together at `level` (Bonferroni).

    The best of many candidates is chosen on the images it is measured on: an interval of 95 %
    for each would let one in twenty of many equal candidates look better than the default.

    Args:
        comparisons: how many candidates are compared with the default.
        level: the confidence of them all together.

    Returns:
        Each interval's confidence.
    """
    return 1.0 - (1.0 - level) / max(comparisons, 1)


def gain(measured: Measured, default: Measured, *, confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """The candidate's held-out accuracy minus the default's, with a paired bootstrap interval over images.

    Args:
        measured: the candidate's measurements.
        default: the default's, on the same images.
        confidence: the interval's coverage (`simultaneous` for one of many).
        seed: seeds the resampling.

    Returns:
        The difference and its interval.
    """
    return paired_bootstrap(
        candidate=measured.probe.correct,
        default=default.probe.correct,
        confidence=confidence,
        resamples=RESAMPLES,
        seed=seed,
    )


def curve_subsets(labels: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> list[np.ndarray]:
    """Nested subsets of the images for the learning curve: whole near-duplicate groups, every class kept in share.

    Args:
        labels: (n,) the images' classes.
        groups: (n,) their near-duplicate groups.
        seed: seeds the draw.

    Returns:
        For each of `CURVE_FRACTIONS`, the sorted indices of the images taken (the last is all of them).
    """
    rng = np.random.default_rng(seed)
    ids, first = np.unique(groups, return_index=True)
    order = np.empty(len(ids), dtype=np.float64)
    for label in np.unique(labels[first]):  # a random rank within each class, spread evenly over [0, 1)
        mine = np.flatnonzero(labels[first] == label)
        order[mine] = (rng.permutation(len(mine)) + rng.random()) / len(mine)
    subsets = []
    for fraction in CURVE_FRACTIONS:
        taken = ids[order < fraction] if fraction < 1 else ids
        subsets.append(np.flatnonzero(np.isin(groups, taken)))
    return subsets


def learning_curve(
    codes: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, full: ProbeResult | None = None, seed: int = 0
) -> list[dict]:
    """Held-out and train accuracy of the probe on growing shares of the images: would more data help?

    Args:
        codes: (n, d) the chosen candidate's codes of the train and val images.
        labels: (n,) their classes.
        groups: (n,) their near-duplicate groups.
        full: the probe's result on all of them, when measured already.
        seed: seeds the subsets.

    Returns:
        Per share: `fraction`, `images`, `held_out_accuracy`, `train_accuracy`; shares whose
        subset has a class with fewer than two images are left out.
    """
    points = []
    for fraction, subset in zip(CURVE_FRACTIONS, curve_subsets(labels, groups, seed=seed)):
        _, counts = np.unique(labels[subset], return_counts=True)
        if len(counts) < len(np.unique(labels)) or counts.min() < 2:
            continue
        if fraction == 1 and full is not None:
            result = full
        else:
            result = probe(decompose(codes[subset], standardise=True), labels[subset], groups=groups[subset])
        points.append(
            {
                "fraction": fraction,
                "images": len(subset),
                "held_out_accuracy": result.accuracy,
                "train_accuracy": result.train_accuracy,
            }
        )
    return points
