"""The plan of an extraction, made before any network runs: the usable images and their split.

Every file is checked once (decoded, its perceptual hash taken) and the check cached by the
file's identity (`file_ids`), bad files are listed in rejected.csv, near-duplicates grouped,
and the usable images split so that each group stays in one subset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np

from cnncodes.codes.check_cache import CheckCache
from cnncodes.codes.duplicates import DUPLICATES_FILE
from cnncodes.codes.engines.job import Engine
from cnncodes.codes.engines.local import CHECK_CHUNK, LocalEngine
from cnncodes.codes.layout import CACHE_DIR, REJECTED_COLUMNS, REJECTED_FILE
from cnncodes.codes.reading import Files
from cnncodes.core import files as artifacts
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.progress import progress_bar
from cnncodes.data import remote
from cnncodes.data.ingest import Dataset, discover, is_uri
from cnncodes.data.split import (
    DEFAULT_DUP_THRESHOLD,
    DEFAULT_FRACTIONS,
    Split,
    assign_subsets,
    duplicate_warnings,
    group_duplicates,
    hash_bits,
)

# A file's size, modification time, inode and change time, as os.stat gives them.
_STAT = np.dtype([("size", "<i8"), ("mtime", "<i8"), ("inode", "<u8"), ("ctime", "<i8")])


def discover_data(data: Path | str) -> Dataset:
    """`discover` for a folder or a CSV, local or in an object store (a URI, or a CSV whose paths are URIs).

    Args:
        data: a class-per-folder directory or a `path,label` CSV, local or `s3://…`.

    Returns:
        The dataset's files and labels.

    Raises:
        CnnCodesError: for missing or empty data, or a CSV that mixes URIs and local paths.
    """
    if is_uri(str(data)):
        return remote.discover_uri(str(data))
    dataset = discover(data)
    uris = sum(map(is_uri, dataset.paths))
    if uris and uris < len(dataset):
        raise CnnCodesError(f"{data} lists URIs and local paths together: list one kind of path per CSV")
    if uris:
        return Dataset(remote.UriRoot(""), dataset.paths, dataset.labels, dataset.skipped)  # type: ignore[arg-type]
    return dataset


def check_out(data: Path | str, out: Path) -> None:
    """A features folder must be a folder, and not inside a class-per-folder DATA, where it would be read as images.

    Args:
        data: the images.
        out: the features folder.

    Raises:
        CnnCodesError: when `out` is a file or inside `data`.
    """
    if out.exists() and not out.is_dir():
        raise CnnCodesError(f"--out {out} is a file: give a folder for the features")
    if not is_uri(str(data)) and Path(data).is_dir() and out.resolve().is_relative_to(Path(data).resolve()):
        raise CnnCodesError(
            f"--out {out} is inside DATA {data}: the next run would read its files as images; write the features "
            "outside the image folder"
        )


class FileIds(Sequence[str]):
    """Each file's identity (`file_ids`), formatted when read.

    Its path is the dataset's own string and its numbers sit in one array, so a million
    files hold no million id strings for the whole run.

    Args:
        names: each file's path under the dataset's root.
        stats: a `_STAT` row per file; a size of -1 is a missing file.
    """

    def __init__(self, names: Sequence[str], stats: np.ndarray):
        self.names, self.stats = names, stats

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size, mtime, inode, ctime = self.stats[index].tolist()
        name = self.names[index]
        return f"{name}|missing" if size < 0 else f"{name}|{size}|{mtime}|{inode}|{ctime}"


def file_ids(dataset: Dataset) -> Sequence[str]:
    """A file's identity for caches: its path, size, modification time, inode and change time.

    The inode and change time catch a file replaced or edited in place with its size and
    modification time kept (`touch -r`, `rsync -a`, `exiftool -P`).

    Args:
        dataset: the files.

    Returns:
        Each file's id, `path|missing` for a file that is not there; in an object store, the
        store's size and modification time.
    """
    if isinstance(dataset.root, remote.UriRoot):
        return remote.file_ids(dataset)
    stats = np.empty(len(dataset.paths), dtype=_STAT)
    for i, rel in enumerate(dataset.paths):
        try:
            st = (dataset.root / rel).stat()
            stats[i] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        except OSError:
            stats[i] = (-1, 0, 0, 0)
    return FileIds(dataset.paths, stats)


class Plan(NamedTuple):
    """The usable images of a dataset and their split, decided before any network runs."""

    usable: Dataset
    split: Split
    rejected: list[tuple[str, str, str]]  # REJECTED_COLUMNS
    file_ids: Sequence[str]
    groups: np.ndarray  # duplicate group of each usable image: equal ids are near-duplicates
    hashes: np.ndarray  # perceptual hash of each usable image (`hash_bits`), for duplicates.csv's distances
    seconds: dict[str, float]  # per stage: check, duplicates, split

    def train_files(self) -> Files:
        """The train images, int8's calibration candidates: names joined to the root only when read."""
        names = [p for p, s in zip(self.split.paths, self.split.subsets) if s == "train"]
        return Files(self.usable.root, names)


def plan(
    dataset: Dataset,
    out: Path,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    workers: int | None = None,
    progress: bool = True,
    engine: Engine | None = None,
) -> Plan:
    """Check every image `discover` found, write `out/rejected.csv`, and split the usable ones.

    Args:
        dataset: the files `discover` found.
        out: the folder whose cache keeps the checks.
        fractions: train, val and test fractions.
        seed: the split's hash seed.
        dup_threshold: pHash bits within which two images are duplicates (-1: off).
        workers: checking threads of the default local engine.
        progress: a progress bar.
        engine: where the files are checked (default: this machine).

    Returns:
        The plan.

    Raises:
        CnnCodesError: when a class, or the whole dataset, has no usable image.
    """
    clock = _Stopwatch()
    all_ids = file_ids(dataset)
    reasons, categories, all_hashes = _check(
        dataset, all_ids, out / CACHE_DIR, engine or LocalEngine(workers=workers), progress
    )
    rejected = dataset.skipped + [
        (p, r, c or "") for p, r, c in zip(dataset.paths, reasons, categories) if r is not None
    ]
    artifacts.write_csv_atomic(out / REJECTED_FILE, REJECTED_COLUMNS, rejected)
    keep = np.flatnonzero([r is None for r in reasons])
    usable = _require_usable(dataset, keep)
    phashes = cast(list[str], [all_hashes[i] for i in keep.tolist()])  # usable files have one
    clock.lap("check")
    groups, bits = group_duplicates(phashes, dup_threshold), hash_bits(phashes)
    warnings = duplicate_warnings(groups, usable.paths, usable.labels, dup_threshold, listing=out / DUPLICATES_FILE)
    clock.lap("duplicates")
    the_split = assign_subsets(usable.paths, usable.labels, groups, fractions, seed)
    the_split.warnings += warnings
    clock.lap("split")
    return Plan(usable, the_split, rejected, _take(all_ids, keep, usable.paths), groups, bits, clock.laps)


class _Stopwatch:
    """Seconds per stage of a run, for meta.json and the scale benchmark."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 3)
        self._last = now


def _check(
    dataset: Dataset, ids: Sequence[str], cache_dir: Path, engine: Engine, progress: bool
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Decode every file once (cached by its identity) to find the bad ones and hash the rest.

    Returns each file's reason to be rejected (None if usable), its category and perceptual hash. The
    cache saves every few thousand files, and what an interrupted check found, so it
    resumes too. A read that failed (an object store's timeout, EIO) is not kept: it may pass next time.
    """
    (cache_dir / "checks.json").unlink(missing_ok=True)  # the cache of earlier versions, rewritten whole per chunk
    cache = CheckCache(cache_dir / "checks.sqlite")
    unsaved: list[int] = []
    reasons: list[str | None] = []
    categories: list[str | None] = []
    phashes: list[str | None] = []

    def save() -> None:
        cache.put(
            [ids[i] for i in unsaved],
            [reasons[i] for i in unsaved],
            [categories[i] for i in unsaved],
            [phashes[i] for i in unsaved],
        )
        unsaved.clear()

    try:
        reasons, categories, phashes = cache.get(ids)
        cache.keep_only(ids)
        # An array, not a list: no int object per file.
        todo = np.flatnonzero([r is None and h is None for r, h in zip(reasons, phashes)])
        with progress_bar("Checking images", len(todo), enabled=progress and bool(len(todo))) as advance:
            for positions, found in engine.check(Files(dataset.root, [dataset.paths[i] for i in todo]), advance):
                rows = todo[positions].tolist()
                for row, check in zip(rows, found):
                    reasons[row], categories[row], phashes[row] = check.reason, check.category, check.phash
                unsaved += [row for row, check in zip(rows, found) if check.category != "unreadable"]
                if len(unsaved) >= CHECK_CHUNK:
                    save()
    finally:
        save()
        cache.close()
    return reasons, categories, phashes


def _take(ids: Sequence[str], rows: np.ndarray, names: Sequence[str]) -> Sequence[str]:
    """The ids of `rows` (ascending), whose paths are `names`: lazy `FileIds` if they were; `ids` if all."""
    if len(rows) == len(ids):
        return ids
    return FileIds(names, ids.stats[rows]) if isinstance(ids, FileIds) else [ids[i] for i in rows.tolist()]


def _require_usable(dataset: Dataset, keep: np.ndarray) -> Dataset:
    """The files at rows `keep`: the dataset's own lists when every file is usable."""
    if not len(keep):
        raise CnnCodesError(
            f"no usable image in {dataset.root}: all {len(dataset)} files were rejected (see rejected.csv)"
        )
    if len(keep) == len(dataset):
        return Dataset(dataset.root, dataset.paths, dataset.labels)
    rows = keep.tolist()
    usable = Dataset(dataset.root, [dataset.paths[i] for i in rows], [dataset.labels[i] for i in rows])
    empty = sorted(set(dataset.labels) - set(usable.labels))
    if empty:
        raise CnnCodesError(f"no usable image in class {', '.join(empty)}: add images or remove the folder")
    return usable
