"""Reading a features folder written by `extract`, checked before anything trusts it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.codes.layout import CODES_FILE, GROUPS_FILE, LABELS_FILE, META_FILE, SPLIT_FILE, unlike_published
from cnncodes.codes.meta import FEATURES_FORMAT, FORMAT_1, validate_meta
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import read_object
from cnncodes.data.split import SUBSETS, Split, assign_subsets, read_split_csv


@dataclass
class Features:
    """CNN codes with their labels, subsets and the record of how they were made."""

    path: Path
    X: np.ndarray
    y: np.ndarray
    subsets: np.ndarray
    paths: list[str]
    meta: dict[str, Any]
    groups: np.ndarray  # duplicate-group id per row: copies share one, so folds and re-splits keep them together
    # Computed from the rows themselves when loaded, not read from meta.json, so a record says what was really used.
    split_fingerprint: str
    # (rows, views, dim), memory-mapped: the code of each scale the extractor saw, whose mean is X. None: X alone.
    views: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the labels' indices."""
        return self.meta["classes"]

    @property
    def spec(self) -> ExtractorSpec:
        """The extractor that made the codes, as meta.json records it."""
        return ExtractorSpec.from_dict(self.meta["extractor"])

    def repeated_splits(self, repeats: int) -> list[tuple[int, np.ndarray]]:
        """The folder's own split, then `repeats - 1` more of the same images by `extract`'s rule, seeds counting up.

        Args:
            repeats: how many splits in all.

        Returns:
            `(seed, subsets)` per split, the folder's own first.
        """
        made = self.meta["split"]
        first = made["seed"]
        labels = [self.classes[i] for i in self.y]
        return [(first, self.subsets)] + [
            (first + k, np.array(assign_subsets(self.paths, labels, self.groups, made["fractions"], first + k).subsets))
            for k in range(1, repeats)
        ]


# The files each format's reader reads besides meta.json (format 1 read the rows from meta.json).
_READ = {
    FEATURES_FORMAT: (CODES_FILE, LABELS_FILE, GROUPS_FILE, SPLIT_FILE),
    FORMAT_1: (CODES_FILE, LABELS_FILE, GROUPS_FILE),
}


def load_features(path: Path | str) -> Features:
    """Load and cross-check `meta.json`, `features.npy`, `labels.npy` and the rows' paths and subsets.

    Those are read from `split.csv`; folders written before it was their only record (format
    1) list them in `meta.json`, and still load.

    Args:
        path: the features folder `extract` wrote.

    Returns:
        The codes, memory-mapped, with everything the folder records of them.

    Raises:
        CnnCodesError: for a folder that is not one, is incomplete, damaged, or of another version.
    """
    path = Path(path)
    meta = _read_meta(path)
    try:
        X = np.load(path / CODES_FILE, mmap_mode="r")
        y = np.load(path / LABELS_FILE)
    except (OSError, ValueError) as e:
        raise _damaged(path, str(e)) from None
    paths, labels, subsets, fingerprint = _rows(path, meta)
    n, classes = meta["n_images"], meta["classes"]
    n_views = meta["extractor"].get("views") or 1
    consistent = (
        X.ndim == 2
        and X.shape == (n, n_views * meta["dim"])
        and y.shape == (n,)
        and np.issubdtype(y.dtype, np.integer)
        and len(paths) == n
        and len(subsets) == n
        and (n == 0 or 0 <= y.min() <= y.max() < len(classes))
        and set(subsets) <= set(SUBSETS)
        and (labels is None or labels == [classes[i] for i in y])
    )
    if not consistent:
        raise CnnCodesError(
            f"the files in {path} do not belong together (features {X.shape}, labels {y.shape}, "
            f"{len(paths)} images listed (split.csv), meta.json says {n}): run `cnncodes extract` again"
        )
    changed = unlike_published(path, meta, _READ[meta["format"]])  # what fits together may still have been edited
    if changed:
        raise _damaged(path, f"{', '.join(changed)} missing or changed since extract wrote {_it(changed)}")
    if fingerprint is None:  # the split's fingerprint sorts every row: made once, where the rows are read
        fingerprint = Split(paths, [classes[i] for i in y.tolist()], list(subsets)).fingerprint
    views = X.reshape(n, n_views, meta["dim"]) if n_views > 1 else None
    X = np.asarray(X, dtype=np.float32) if views is None else _mean_of_views(views)
    return Features(path, X, y, np.array(subsets), paths, meta, _groups(path, meta), fingerprint, views)


def recorded_split(path: Path | str) -> Split:
    """The split of a features folder, as its split.csv lists it, checked as `load_features` checks it.

    Another run (`finetune --split-from`) trusts it to keep the test images out of training.

    Args:
        path: the features folder.

    Returns:
        The split.

    Raises:
        CnnCodesError: for a folder that is not one, or whose split.csv is not the split meta.json recorded.
    """
    path = Path(path)
    meta = _read_meta(path)
    changed = unlike_published(path, meta, (SPLIT_FILE,))
    if changed:
        raise _damaged(path, f"{SPLIT_FILE} missing or changed since extract wrote it")
    return _checked_split(path, meta)


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a features folder, checked against its one definition (`FeaturesMeta`)."""
    if not (path / META_FILE).is_file():
        raise CnnCodesError(
            f"{path} is not a features folder (no meta.json): make one with `cnncodes extract DATA --out FEATURES` "
            "and give FEATURES here"
        )
    try:
        meta = read_object(path / META_FILE)
    except (OSError, ValueError) as e:
        raise _damaged(path, str(e)) from None
    return validate_meta(meta, path / META_FILE)


def _damaged(path: Path, why: str) -> CnnCodesError:
    return CnnCodesError(f"features folder {path} is incomplete or damaged ({why}): run `cnncodes extract` again")


def _it(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"


# Codes larger than this are averaged into a memory-mapped temporary file, not memory.
IN_MEMORY_BYTES = 1 << 30


def _mean_of_views(views: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The images' codes, a chunk of rows at a time, memory-mapped when large (as `features.npy` itself is).

    The file is deleted as soon as it is mapped: its pages stay until the array goes, and the
    kernel can drop them, so `sgd` still streams the codes of a million images.
    """
    shape = views.shape[::2]
    if views.shape[0] * views.shape[2] * 4 <= IN_MEMORY_BYTES:
        codes = np.empty(shape, dtype=np.float32)
    else:
        with tempfile.NamedTemporaryFile(prefix="cnncodes-codes-", suffix=".f32") as scratch:
            codes = np.memmap(scratch, dtype=np.float32, mode="w+", shape=shape)
    for start in range(0, len(views), chunk):
        codes[start : start + chunk] = views[start : start + chunk].mean(axis=1)
    return codes


def _rows(path: Path, meta: dict[str, Any]) -> tuple[list[str], list[str] | None, list[str], str | None]:
    """Each row's path, label and subset, and the split's fingerprint when it was checked against meta.json's.

    They come from split.csv; format 1's from meta.json, whose labels are labels.npy's only. A folder
    without rows (every usable image failed to decode) has a split.csv of its header alone.
    """
    if meta["format"] == FORMAT_1:
        return meta["paths"], None, meta["subsets"], None
    if meta["n_images"] == 0:
        return [], [], [], None
    the_split = _checked_split(path, meta)
    return the_split.paths, the_split.labels, the_split.subsets, the_split.fingerprint


def _checked_split(path: Path, meta: dict[str, Any]) -> Split:
    """split.csv, refused unless its fingerprint is the one meta.json recorded (a row moved to train is a leak)."""
    try:
        the_split = read_split_csv(path / SPLIT_FILE)
    except CnnCodesError as e:
        raise _damaged(path, str(e)) from None
    if the_split.fingerprint != meta["split"]["fingerprint"]:
        raise CnnCodesError(
            f"{path}/split.csv is not the split these codes were made with (its fingerprint is not meta.json's): "
            "run `cnncodes extract` again"
        )
    return the_split


def _groups(path: Path, meta: dict[str, Any]) -> np.ndarray:
    """The duplicate groups `extract` saved; one group per row only where none can be missing.

    Folders of format 1 without duplicates may predate groups.npy; anywhere else a missing
    groups.npy would let copies of an image sit on both sides of a fold, so it is refused.
    """
    n = meta["n_images"]
    try:
        groups = np.load(path / GROUPS_FILE)
    except (OSError, ValueError) as e:
        if meta["format"] == FORMAT_1 and not meta["split"].get("duplicate_groups"):
            return np.arange(n)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _damaged(path, f"{GROUPS_FILE}: {why}; without it, copies of an image could be in two folds") from None
    if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
        raise CnnCodesError(
            f"{path}/groups.npy does not belong to these features ({groups.shape} for {n} rows): "
            "run `cnncodes extract` again"
        )
    return groups
