"""The code rows `extract` keeps on disk as they come, in `.npy` files read and written by rows.

A save costs the new rows, never everything so far, so a million images cost no more per
batch than a thousand, and the rows survive a kill at any moment.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.lib.format import open_memmap, read_array_header_1_0, read_array_header_2_0, read_magic

from cnncodes.core import files as artifacts
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.writes import NO_SPACE, human_bytes, says_where

# Seconds between two syncs of finished rows and of the clock (a kill loses at most this much work and time).
SYNC_EVERY = 2.0
# Rows copied per read and write: memory stays bounded by a chunk.
CHUNK_ROWS = 1024
# FeatureWriter's files, and the finished rows of a run with missing rows, ready to be published.
_DATA, _IDS, _LOG, _STATE, _CLOCK, _FINISHED = (
    "partial.npy",
    "partial-ids.npy",
    "partial-done.i64",
    "partial.json",
    "partial-seconds.txt",
    "finished.npy",
)
# `salvage`'s rows set aside: the codes, a file id digest per row (blank where unfinished), and their seconds.
_ASIDE, _ASIDE_IDS, _ASIDE_INFO = "salvaged.npy", "salvaged-ids.npy", "salvaged.json"
_BLANK = b"\0" * 16


class FeatureWriter:
    """Stores code rows in a float32 `.npy` as they come, in any order: memory is bounded by a batch.

    Rows are written with positioned writes (the page cache holds them, not this process),
    into a file whose disk space is reserved up front. Every couple of seconds the file
    is synced and then the numbers of the rows it holds are appended to a log, so a killed
    run resumes where it stopped and a save costs the new rows only. The state is tied to
    `key`, so different settings never reuse its rows; `ids` (a digest per row) and `family`
    (the extractor) let `salvage` find its finished rows again when the files change before
    the resume. `finished_file` gives the result to move into place.
    """

    def __init__(self, work_dir: Path, key: str, n_rows: int, dim: int, ids: np.ndarray, family: str):
        work_dir.mkdir(parents=True, exist_ok=True)
        self._data, self._ids = work_dir / _DATA, work_dir / _IDS
        self._log, self._state = work_dir / _LOG, work_dir / _STATE
        self._clock, self._finished = work_dir / _CLOCK, work_dir / _FINISHED
        self.dim = dim
        expected = {"key": key, "rows": n_rows, "dim": dim, "family": family}
        if not self._resume(expected):
            self._state.unlink(missing_ok=True)  # first, so a crash below cannot pair old state with new rows
            reserve_npy(self._data, (n_rows, dim))
            self.done = np.zeros(n_rows, dtype=bool)
            self.seconds_before = 0.0
            self._log.write_bytes(b"")
            self._clock.unlink(missing_ok=True)
            artifacts.write_npy_atomic(self._ids, ids)
            artifacts.write_json_atomic(self._state, expected)
        self._offset = npy_layout(self._data)[1]
        self._fd = os.open(self._data, os.O_RDWR)
        self._unsynced: list[np.ndarray] = []
        self._started = self._synced = time.perf_counter()

    def _resume(self, expected: dict) -> bool:
        try:
            if artifacts.read_json(self._state) != expected:
                return False
            shape = npy_layout(self._data)[0]
            logged = np.fromfile(self._log, dtype="<i8")
        except (OSError, ValueError):
            return False
        if shape != (expected["rows"], expected["dim"]):
            return False
        self.done = np.zeros(expected["rows"], dtype=bool)
        self.done[logged[(logged >= 0) & (logged < expected["rows"])]] = True
        try:
            self.seconds_before = float(self._clock.read_text())
        except (OSError, ValueError):
            self.seconds_before = 0.0
        return True

    @property
    def todo(self) -> np.ndarray:
        """The rows not written yet."""
        return np.flatnonzero(~self.done)

    @property
    def seconds(self) -> float:
        """Seconds this writer's rows took so far, interrupted runs included."""
        return self.seconds_before + time.perf_counter() - self._started

    def write(self, rows: np.ndarray, codes: np.ndarray) -> None:
        """Store `codes` at `rows`; they survive a crash from the next `sync` on (every SYNC_EVERY seconds).

        Args:
            rows: the rows, in any order.
            codes: a code per row.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        codes = np.ascontiguousarray(codes, dtype="<f4").reshape(len(rows), self.dim)
        with says_where(self._data, self._data, needed=self._space_needed):  # a file system out of space
            for start, stop in _runs(rows):
                os.pwrite(self._fd, codes[start:stop].tobytes(), self._offset + int(rows[start]) * self.dim * 4)
        self.done[rows] = True
        self._unsynced.append(rows)
        if time.perf_counter() - self._synced > SYNC_EVERY:
            self.sync()

    def _space_needed(self) -> int:
        """What a full disk must free for the run to finish: the rows not written yet or not yet synced."""
        rows = int(np.count_nonzero(~self.done)) + sum(map(len, self._unsynced))
        return rows * self.dim * 4

    def sync(self) -> None:
        """Make the rows written so far survive a crash: data on disk first, then the log that names them."""
        if self._unsynced:
            with says_where(self._data, self._data, needed=self._space_needed):
                os.fdatasync(self._fd)
            with says_where(self._log, self._log), open(self._log, "ab") as log:
                log.write(np.concatenate(self._unsynced).astype("<i8").tobytes())
            self._unsynced = []
            self.save_clock()
        self._synced = time.perf_counter()

    def save_clock(self) -> None:
        """Record the time worked so far, for the run that resumes these rows."""
        artifacts.write_bytes_atomic(self._clock, f"{self.seconds:.3f}".encode())

    def copy_from(self, source: Path, pairs: np.ndarray, seconds: float) -> None:
        """Take rows (new, old) from an earlier run's features file instead of recomputing them.

        Rows already done are left as they are: a copy interrupted by a kill goes on where it
        stopped. `seconds`, what computing all of `pairs` took, goes into the clock by the rows
        copied: the clock is the one record of the rows' time, which later kills keep.

        Args:
            source: the earlier run's `.npy`.
            pairs: (new row, old row) of each row to take.
            seconds: what computing all of `pairs` took.
        """
        per_row = seconds / max(len(pairs), 1)
        pairs = pairs[~self.done[pairs[:, 0]]]
        with npy_rows(source) as old:
            for start in range(0, len(pairs), CHUNK_ROWS):
                chunk = pairs[start : start + CHUNK_ROWS]
                self.seconds_before += per_row * len(chunk)
                self.write(chunk[:, 0], old.read(chunk[:, 1]))
        self.sync()
        self.save_clock()

    def finished_file(self) -> tuple[Path, np.ndarray]:
        """The file of the finished rows, on disk, to be moved into place; and which rows it holds.

        Every row finished: the writer's own file. Otherwise a copy of the finished ones. Call
        `discard` once the file is moved and recorded.
        """
        self.sync()
        os.close(self._fd)
        kept = np.flatnonzero(self.done)
        if len(kept) == len(self.done):
            return self._data, kept
        reserve_npy(self._finished, (len(kept), self.dim))
        with npy_rows(self._data) as source, npy_rows(self._finished, write=True) as out:
            for start in range(0, len(kept), CHUNK_ROWS):
                rows = kept[start : start + CHUNK_ROWS]
                out.write(np.arange(start, start + len(rows)), source.read(rows))
        return self._finished, kept

    def discard(self) -> None:
        """Forget the unfinished state, once the published rows are recorded elsewhere."""
        for path in (self._state, self._log, self._clock, self._data, self._ids, self._finished):
            path.unlink(missing_ok=True)


class Salvaged(NamedTuple):
    """Finished rows of an interrupted run over other files: where they are, (new row, old row) pairs, their time."""

    path: Path
    pairs: np.ndarray
    seconds: float

    def discard(self) -> None:
        """Remove the rows set aside, once copied."""
        _discard_aside(self.path.parent)


def salvage(work_dir: Path, key: str, ids: np.ndarray, family: str) -> Salvaged | None:
    """The finished rows of an interrupted run of the same extractor whose files were different, set aside.

    A file added or deleted before the resume changes the writer's key; without this, every
    row the interrupted run finished would be computed again. The rows move to files of their
    own (the new writer reuses the names of the old one), which stay until the caller has
    copied them and calls `discard`: a copy cut short by a kill goes on at the next run.

    Args:
        work_dir: the folder of the writer's files.
        key: the new writer's key.
        ids: the new run's file id digests, a row each.
        family: the extractor's key: rows of other settings are never salvaged.

    Returns:
        The rows set aside that these files still have, or None.
    """
    _set_aside(work_dir, key, family)
    try:
        info = artifacts.read_object(work_dir / _ASIDE_INFO)
        if info.get("family") != family:  # rows of other settings: the file ids alone would match them
            _discard_aside(work_dir)  # and this run's writer replaces the rest of those settings' rows
            return None
        old_ids = np.load(work_dir / _ASIDE_IDS)
        npy_layout(work_dir / _ASIDE)
    except (OSError, ValueError):
        return None
    pairs = matching_rows(old_ids, ids)
    aside = Salvaged(
        work_dir / _ASIDE, pairs, float(info.get("seconds", 0.0)) * len(pairs) / max(info.get("rows", 1), 1)
    )
    if not len(pairs):
        aside.discard()
        return None
    return aside


def _set_aside(work_dir: Path, key: str, family: str) -> None:
    """Move the writer's files of another key but the same extractor aside, with the ids of their finished rows."""
    try:
        state = artifacts.read_object(work_dir / _STATE)
        if state.get("key") == key or state.get("family") != family:
            return
        old_ids = np.load(work_dir / _IDS)
        logged = np.fromfile(work_dir / _LOG, dtype="<i8")
        seconds = float((work_dir / _CLOCK).read_text()) if (work_dir / _CLOCK).is_file() else 0.0
    except (OSError, ValueError):
        return
    finished = np.zeros(len(old_ids), dtype=bool)
    finished[logged[(logged >= 0) & (logged < len(old_ids))]] = True
    if not finished.any() or not (work_dir / _DATA).is_file():
        return
    _discard_aside(work_dir)  # rows of an earlier set-aside not copied yet are lost: never paired with other ids
    artifacts.write_npy_atomic(work_dir / _ASIDE_IDS, np.where(finished, old_ids, _BLANK))
    artifacts.write_json_atomic(
        work_dir / _ASIDE_INFO, {"family": family, "seconds": seconds, "rows": int(finished.sum())}
    )
    os.replace(work_dir / _DATA, work_dir / _ASIDE)
    (work_dir / _STATE).unlink()


def _discard_aside(work_dir: Path) -> None:
    """Remove rows set aside: the codes first, so codes are never left without their ids."""
    for name in (_ASIDE, _ASIDE_IDS, _ASIDE_INFO):
        (work_dir / name).unlink(missing_ok=True)


def matching_rows(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(row in `ids`, row in `known`) of every file id digest both hold, found by sorting: no dict of a million ids.

    Args:
        known: the digests of the rows on disk.
        ids: the digests of the rows wanted.

    Returns:
        An (n, 2) int64 array of row pairs.
    """
    if not len(known):
        return np.empty((0, 2), dtype=np.int64)
    order = np.argsort(known)
    at = np.searchsorted(known[order], ids).clip(max=len(known) - 1)
    hit = known[order[at]] == ids
    return np.stack([np.flatnonzero(hit), order[at[hit]]], axis=1).astype(np.int64)


class NpyRows:
    """Rows of a 2-D float32 `.npy` read (or written) with positioned file I/O, not a memory map.

    A memory map would count every page it touched in this process's memory; file I/O
    leaves them to the page cache, so memory stays bounded by a chunk of rows.
    """

    def __init__(self, fd: int, shape: tuple[int, ...], offset: int):
        self.fd, self.shape, self.offset = fd, shape, offset

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The codes at `rows`, a system call per run of consecutive rows.

        Args:
            rows: the rows to read.

        Returns:
            A (len(rows), dim) float32 array.
        """
        dim = self.shape[1]
        out = np.empty((len(rows), dim), dtype="<f4")
        for start, stop in _runs(rows):
            data = os.pread(self.fd, (stop - start) * dim * 4, self.offset + int(rows[start]) * dim * 4)
            out[start:stop] = np.frombuffer(data, dtype="<f4").reshape(stop - start, dim)
        return out

    def write(self, rows: np.ndarray, codes: np.ndarray) -> None:
        """Store `codes` at `rows`, a system call per run of consecutive rows.

        Args:
            rows: the rows to write.
            codes: a code per row.
        """
        dim = self.shape[1]
        codes = np.ascontiguousarray(codes, dtype="<f4")
        for start, stop in _runs(rows):
            os.pwrite(self.fd, codes[start:stop].tobytes(), self.offset + int(rows[start]) * dim * 4)


@contextmanager
def npy_rows(path: Path, write: bool = False) -> Iterator[NpyRows]:
    """`NpyRows` of the file at `path`; written rows are synced to disk on the way out.

    Args:
        path: a 2-D float32 `.npy`.
        write: open it for writing too.

    Yields:
        The rows' reader and writer.
    """
    shape, offset = npy_layout(path)
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        yield NpyRows(fd, shape, offset)
        if write:
            os.fsync(fd)
    finally:
        os.close(fd)


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) positions of the runs of consecutive row numbers in `rows`: one system call each."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return itertools.pairwise([0, *breaks.tolist(), len(rows)])


def npy_layout(path: Path) -> tuple[tuple[int, ...], int]:
    """Shape and data offset of a C-ordered float32 `.npy`.

    Args:
        path: the file.

    Returns:
        (shape, offset of the first byte of data).

    Raises:
        ValueError: for any other array or file.
    """
    with open(path, "rb") as f:
        version = read_magic(f)
        shape, fortran, dtype = (read_array_header_1_0 if version == (1, 0) else read_array_header_2_0)(f)
        if fortran or dtype != np.dtype("<f4"):
            raise ValueError(f"{path} is not a C-ordered float32 array")
        return shape, f.tell()


def reserve_npy(path: Path, shape: tuple[int, int]) -> None:
    """A new float32 .npy with its disk space reserved now: a full disk is one error here, not a SIGBUS later.

    Args:
        path: the file to create.
        shape: (rows, columns).

    Raises:
        CnnCodesError: when the disk has not the space.
    """
    try:
        header = open_memmap(path, mode="w+", dtype=np.float32, shape=shape)  # writes the header, sizes the file
        del header
        _reserve(path)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        path.unlink(missing_ok=True)
        raise CnnCodesError(
            f"not enough space in {path.parent} for the codes: {human_bytes(shape[0] * shape[1] * 4)} needed "
            f"({e.strerror}); free some space and run the same command again (finished work is kept)"
        ) from None


def _reserve(path: Path) -> None:
    """Allocate every block of a sparse file; file systems that cannot are left as they are."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
