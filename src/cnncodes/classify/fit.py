"""`fit_classifiers` (the `cnncodes fit-svm` command): classifiers fitted on a features folder, each scored once.

Each kind is chosen and fitted on the train+val codes (by cross-validation, or on the val
subset), scored on the test codes, and saved as a bundle beside its run record; with repeats,
the same images are split again and each split fitted and scored on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import PredefinedSplit

from cnncodes.classify.calibration import class_probabilities
from cnncodes.classify.estimator import SGD_WITH_PCA, CodesClassifier
from cnncodes.classify.streaming import SGD_CHUNK, chunks
from cnncodes.codes.features import Features, load_features
from cnncodes.core.choices import KINDS, MAX_EXACT, NORMALIZERS
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import exclusive
from cnncodes.core.progress import progress_bar, warn
from cnncodes.runs.bundle import publish_bundle
from cnncodes.runs.evaluate import per_image_predictions, score
from cnncodes.runs.records import build_record, refuse_to_replace, repeat_score, repeats_summary, run_name

# Above `MAX_EXACT` training codes (see choices.py) `all` leaves these out, and `sgd`, their streaming
# stand-in, takes their place.
_QUADRATIC = ("linear-svm", "rbf-svm", "knn")
_EXACT = ("linear-svm", "logreg", "rbf-svm", "knn")
_SCALABLE = ("logreg", "sgd")
# Builds the classifier of one split from its train+val subsets (which `cv=0` chooses on).
_MakeClassifier = Callable[[np.ndarray], CodesClassifier]
# One split: its seed and a subset name (train, val or test) per image.
_Split = tuple[int, np.ndarray]
# In a models folder: the lock of the fit-svm writing there, so two never replace each other's runs unseen.
FIT_LOCK = ".fit-svm.lock"


def choose_kinds(
    names: str | Sequence[str], n_fit: int, max_exact: int = MAX_EXACT, pca: int | None = None
) -> list[str]:
    """The kinds to fit for `names` on `n_fit` codes, checked before anything is fitted.

    `all` is every kind that suits the size: up to `max_exact` training codes the four exact kinds
    (sgd, a streaming approximation of the linear ones, adds nothing there), above it logreg and sgd
    (logreg alone with `pca`: sgd streams the codes, PCA needs them in memory), with one line naming
    what it left out. A kind asked for by name runs at any size, with a warning: never an hours-long
    silent fit. A refused kind leaves no half-done run.

    Args:
        names: kinds or `all`, in the order wanted.
        n_fit: the training codes (train+val).
        max_exact: training codes above which `all` fits the scalable kinds only.
        pca: the components asked for, if any.

    Returns:
        The kinds, in the order given, without repeats.

    Raises:
        CnnCodesError: no kind, an unknown kind, or sgd with PCA.
    """
    names = [names] if isinstance(names, str) else list(names)  # "logreg" is one kind, not six letters
    if not names:
        raise CnnCodesError(f"no classifier given: use one or more of {', '.join(KINDS)}, or all")
    large = n_fit > max_exact
    scalable = tuple(k for k in _SCALABLE if not (pca and k == "sgd"))
    kinds: list[str] = []
    for name in names:
        for kind in (scalable if large else _EXACT) if name == "all" else [name]:
            if kind not in KINDS:
                raise CnnCodesError(f"unknown classifier {kind!r}: use one of {', '.join(KINDS)} or all")
            if kind not in kinds:
                kinds.append(kind)
    if pca and "sgd" in kinds:
        raise CnnCodesError(SGD_WITH_PCA)
    if large:
        size = f"{n_fit:,} training codes (above {max_exact:,})"
        if "all" in names and (left := [k for k in (*_QUADRATIC, "sgd") if k not in kinds]):
            instead = "logreg only (sgd streams the codes, --pca needs them in memory)" if pca else "sgd fitted instead"
            warn(f"all: {', '.join(left)} left out on {size}, where they would take hours; {instead}")
        for kind in (k for k in _QUADRATIC if k in kinds):
            warn(f"{kind} may take hours on {size}: --classifier sgd scales to any size")
    return kinds


def fit_classifiers(
    features: Path | str,
    *,
    out: Path | str,
    classifiers: str | Sequence[str] = ("all",),
    normalize: str = "auto",
    pca: int | None = None,
    cv: int = 5,
    class_weight: str | None = None,
    n_jobs: int | None = -1,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
    repeats: int = 1,
    max_exact: int = MAX_EXACT,
) -> list[dict[str, Any]]:
    """Fit each classifier on the train (and val) codes, score it once on the test codes, save it.

    Writes `<run>.joblib` (the fitted model, class names and the extractor spec) and
    `<run>.json` (the run record) per classifier into `out`, published as a pair (`publish_run`).
    With `repeats` K > 1 the same images are split again K-1 times (seeds after the features'
    own, duplicate groups kept together), each split fitted and scored on its own; the record
    adds the per-split accuracies, their mean and standard deviation. The bundle is the first split's.

    Args:
        features: a folder written by `extract`.
        out: the models folder.
        classifiers: `linear-svm`, `logreg`, `rbf-svm`, `knn`, `sgd` or `all` (repeatable; see `choose_kinds`).
        normalize: `auto` (standard, l2 and none, chosen by cross-validation), `standard`, `l2` or `none`.
        pca: reduce the codes to this many principal components first.
        cv: folds of group-aware cross-validation on train+val; 0 chooses on the val subset.
        class_weight: `balanced` for imbalanced classes.
        n_jobs: parallel jobs of the search (-1: all cores).
        seed: the folds' seed.
        name: prefix of the run names.
        progress: a rich progress bar.
        repeats: splits to score on (see above).
        max_exact: training codes above which `all` fits logreg and sgd only (a kind named anyway warns),
            and training rows (images times views) above which models train on the codes, not every view.

    Returns:
        The run records, one per classifier, in the order fitted.

    Raises:
        CnnCodesError: unusable features or settings, runs in `out` made from other codes, or another
            fit-svm writing to `out` (its lock is held for the whole run).
    """
    settings = dict(normalize=normalize, pca=pca, class_weight=class_weight, n_jobs=n_jobs, random_state=seed)
    feats, kinds, splits = _prepare(features, classifiers, normalize, pca, repeats, max_exact)
    origin = _origin(feats, normalize, pca, class_weight)
    out = Path(out)
    runs = {run_name(name, feats.spec.backbone, feats.spec.layer, kind): kind for kind in kinds}
    busy = f"another cnncodes fit-svm is writing to {out}: wait for it to finish, or give this one another --out"
    with exclusive(out / FIT_LOCK, busy):
        for run in runs:  # all refused before any is fitted
            refuse_to_replace(out / f"{run}.joblib", origin)
        make = partial(_classifier, cv=cv, settings=settings)
        with progress_bar("Fitting classifiers", len(kinds) * repeats, unit="model", enabled=progress) as advance:
            records = _fit_runs(feats, out, runs, splits, make, origin, advance)
    _warn_if_reduced(records[0]["params"], cv, pca)
    return records


# The `cnncodes fit-svm` command's name for `fit_classifiers`, which library code may call too.
fit_svm = fit_classifiers


def release_workers() -> None:
    """Stop the worker processes the searches ran on (joblib's reusable pool), now rather than as Python exits.

    Python waits for them after the program has ended, where a Ctrl-C is only reported as
    "Exception ignored" and the exit code stays 0; a command calls this while it still handles
    Ctrl-C. The next search starts a new pool.
    """
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def _prepare(
    features: Path | str,
    classifiers: str | Sequence[str],
    normalize: str,
    pca: int | None,
    repeats: int,
    max_exact: int,
) -> tuple[Features, list[str], list[_Split]]:
    """The features, the kinds to fit and the splits to score on, every setting checked before any fit."""
    feats = load_features(features)
    n_fit = int((feats.subsets != "test").sum())
    kinds = choose_kinds(classifiers, n_fit, max_exact, pca)
    if feats.views is not None and n_fit * feats.views.shape[1] > max_exact:
        feats = replace(feats, views=None)  # as many rows as `all` leaves the quadratic kinds out for: the codes
    if normalize not in NORMALIZERS:
        raise CnnCodesError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZERS)}")
    if repeats < 1:
        raise CnnCodesError(f"--repeats must be at least 1 (got {repeats})")
    splits = feats.repeated_splits(repeats)
    if any(not (subsets == "test").any() for _, subsets in splits):
        raise CnnCodesError(f"{feats.path} has no test images: extract again with a --split that keeps a test share")
    for _, subsets in splits:
        _check_training_classes(feats, subsets)
    return feats, kinds, splits


def _fit_runs(
    feats: Features,
    out: Path,
    runs: dict[str, str],
    splits: list[_Split],
    make: Callable[..., CodesClassifier],
    origin: dict[str, Any],
    advance: Callable[[int], None],
) -> list[dict[str, Any]]:
    """Each run (name: kind) fitted and saved in turn, its classifiers made by `make(subsets, kind=kind)`.

    On Ctrl-C, the error notes which runs were saved.
    """
    records: list[dict[str, Any]] = []
    try:
        for run, kind in runs.items():
            records.append(_fit_one(feats, out, run, kind, splits, partial(make, kind=kind), origin, advance))
    except KeyboardInterrupt as e:  # each run is saved when fitted: say which are, for the CLI's last line
        if records:
            e.add_note(f"{', '.join(r['run'] for r in records)} saved in {out}; the others were not fitted.")
        raise
    return records


def _origin(feats: Features, normalize: str, pca: int | None, class_weight: str | None) -> dict[str, Any]:
    """What runs are made of, which a run refuses to be replaced by another of: not where the features
    folder is (moved, it holds the same codes)."""
    return {
        "codes_fingerprint": feats.meta.get("run_key"),  # the images' identities, the extractor and the split
        "extractor": feats.meta["extractor"],
        "split_fingerprint": feats.split_fingerprint,
        "normalize": normalize,
        "pca": pca,
        "class_weight": class_weight,
    }


def _check_training_classes(feats: Features, subsets: np.ndarray) -> None:
    """Every class needs two training images: a class with none could never be predicted, yet would be scored.

    It happens when a class's images are near-duplicates of another class's (their group goes where its
    first image's class puts it) or when a class has two images, one of them in test.
    """
    counts = np.bincount(feats.y[subsets != "test"], minlength=len(feats.classes))
    short = [f"{c!r} ({n})" for c, n in zip(feats.classes, counts.tolist()) if n < 2]
    if short:
        raise CnnCodesError(
            f"every class needs at least 2 training images (train+val); {', '.join(short)} "
            f"{'has' if len(short) == 1 else 'have'} fewer: add distinct images, or remove the folder, then "
            "extract again"
        )


def _warn_if_reduced(used: dict[str, Any], cv: int, pca: int | None) -> None:
    """Say so when the data allowed fewer folds or components than asked for (the records hold what was used)."""
    if cv and used["cv"] < cv:
        warn(f"--cv {cv}: {used['cv']} folds used, as many as the smallest class and the duplicate groups allow")
    if pca and used["pca"] is not None and used["pca"] < pca:
        warn(f"--pca {pca}: {used['pca']} components used, as many as the codes' length and CV folds allow")


def _classifier(subsets: np.ndarray, *, kind: str, cv: int, settings: dict[str, Any]) -> CodesClassifier:
    """The unfitted classifier of one split, choosing on its train+val `subsets` (see `_selection_splitter`)."""
    return CodesClassifier(kind=kind, cv=_selection_splitter(subsets, cv), **settings)


def _selection_splitter(subsets: np.ndarray, cv: int) -> int | PredefinedSplit:
    """Folds of the train+val codes, or with `cv=0` the val subset as the one held-out fold."""
    if cv < 0 or cv == 1:
        raise CnnCodesError(f"--cv must be 0 (choose on the val subset) or at least 2 folds (got {cv})")
    if cv:
        return cv
    if not (subsets == "val").any():
        raise CnnCodesError("--cv 0 chooses hyper-parameters on the val subset, but there is none: use --cv 5")
    return PredefinedSplit(np.where(subsets == "val", 0, -1))


def _fit_split(
    feats: Features, subsets: np.ndarray, make: _MakeClassifier
) -> tuple[CodesClassifier, np.ndarray, float]:
    """A model chosen and fitted on one split's train+val, its probabilities on that split's test images, and
    the seconds the fit took."""
    fit_rows = subsets != "test"
    model = make(subsets[fit_rows])
    started = time.perf_counter()
    try:
        model.fit_rows(feats.X, feats.y, np.flatnonzero(fit_rows), groups=feats.groups, views=feats.views)
    except ValueError as e:
        raise CnnCodesError(str(e)) from None
    seconds = time.perf_counter() - started
    test = np.flatnonzero(subsets == "test")  # scored a chunk at a time: the codes may not fit in memory
    parts = [class_probabilities(model, feats.X[chunk], len(feats.classes)) for chunk in chunks(test, SGD_CHUNK)]
    return model, np.vstack(parts), seconds


def _fit_one(
    feats: Features,
    out: Path,
    run: str,
    kind: str,
    splits: list[_Split],
    make: _MakeClassifier,
    origin: dict[str, Any],
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """One run: the model of the first split saved as its bundle, scored on every split; returns its record."""
    spec = feats.spec
    (first_seed, subsets), *others = splits
    model, proba, fit_seconds = _fit_split(feats, subsets, make)
    advance(1)
    test_rows = subsets == "test"
    repeats = [repeat_score(first_seed, feats.y[test_rows], proba)]
    for seed, other in others:
        repeats.append(repeat_score(seed, feats.y[other == "test"], _fit_split(feats, other, make)[1]))
        advance(1)
    record = build_record(
        run=run,
        method="cnn-codes",
        backbone=spec.backbone,
        layer=spec.layer,
        classifier=kind,
        params={
            **model.best_params_,
            "pca": model.n_components_,
            "views": model.n_views_,
            "class_weight": model.class_weight,
            "cv": model.n_folds_ if isinstance(model.cv, int) else "val",
            "temperature": round(model.temperature_, 4),
        },
        cv_score=model.cv_score_,
        grid_edges=model.grid_edges_,
        origin=origin,
        dataset={
            "data": feats.meta["data"],
            "features": str(feats.path.resolve()),
            "split_fingerprint": feats.split_fingerprint,
        },
        classes=feats.classes,
        n_train=int((~test_rows).sum()),
        n_test=int(test_rows.sum()),
        **score(feats.y[test_rows], proba, feats.classes),
        **(repeats_summary(repeats) if others else {}),
        fit_seconds=round(fit_seconds, 3),
        extract_seconds=feats.meta["elapsed_seconds"],
        test_predictions=per_image_predictions(
            [p for p, t in zip(feats.paths, test_rows) if t], feats.y[test_rows], proba, feats.classes
        ),
    )
    return publish_bundle(
        out / f"{run}.joblib",
        {"run": run, "model": model, "classes": feats.classes, "extractor": feats.meta["extractor"]},
        record,
    )
