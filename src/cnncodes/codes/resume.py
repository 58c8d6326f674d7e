"""The codes of a run: rows an earlier run made are reused, the engine computes the rest.

A row is found again by the digest of its file's identity (`id_digests`), in three places:
an interrupted run of the same files (resumed), the last published features (reused), and an
interrupted run over other files (salvaged). Only the rows none of them holds are computed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnncodes.codes.engines.job import CodeJob, Engine
from cnncodes.codes.layout import CACHE_DIR, CODES_FILE, ROW_IDS_FILE, ROWS_FILE, finish_publishing
from cnncodes.codes.store import FeatureWriter, matching_rows, npy_layout, salvage
from cnncodes.core import files as artifacts
from cnncodes.core.progress import progress_bar
from cnncodes.data.decode import BadImage


def id_digests(file_ids: Sequence[str]) -> np.ndarray:
    """A 16-byte digest of each file's identity: a million of them are 16 MB, sortable and comparable at once.

    Args:
        file_ids: each file's identity (`plan.file_ids`).

    Returns:
        The digests, an `S16` array.
    """
    return np.array(
        [hashlib.blake2b(fid.encode("utf-8", "surrogateescape"), digest_size=16).digest() for fid in file_ids],
        dtype="S16",
    )


def writer_key(family: str, ids: np.ndarray) -> str:
    """The key of the rows of these files made by the extractor `family` (its `key`): a run resumes rows of its key.

    Args:
        family: the extractor's key.
        ids: each row's file id digest (`id_digests`).

    Returns:
        The key.
    """
    return artifacts.sha256_json([family, hashlib.sha256(ids.tobytes()).hexdigest()])


class Computed(NamedTuple):
    """The filled FeatureWriter of a run, and how its rows came to be."""

    writer: FeatureWriter
    computed: int
    reused: int
    failed: list[tuple[int, BadImage]]
    seconds: float  # this run's forward passes
    earlier_seconds: float  # the share of earlier runs' time in the rows reused or resumed
    ids: np.ndarray  # the digest of each row's file id (`id_digests`)

    @property
    def images_per_second(self) -> float | None:
        """This run's rate of computing codes; None when it computed none."""
        return self.computed / self.seconds if self.computed and self.seconds else None

    def failed_paths(self, paths: Sequence[str]) -> list[tuple[str, str, str]]:
        """The files that failed while their codes were computed, as rejected.csv lists them.

        Args:
            paths: each row's path.

        Returns:
            (path, reason, category) of each.
        """
        return [(paths[row], str(bad), bad.category) for row, bad in self.failed]


def compute_codes(
    out: Path,
    job: CodeJob,
    file_ids: Sequence[str],
    engine: Engine,
    *,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> Computed:
    """Fill a FeatureWriter: resume, reuse rows of an earlier run, then let `engine` compute the rest.

    Args:
        out: the features folder, whose cache holds the rows.
        job: what to compute.
        file_ids: each row's file identity.
        engine: where the codes are computed.
        progress: a progress bar.
        on_batch: called with (rows done, rows in all) once each batch is safely stored.

    Returns:
        The filled writer and how its rows came to be.
    """
    ids = id_digests(file_ids)  # one pass over the ids: the writer's key and every match use their digests
    writer = _seeded_writer(out, job, ids)
    reused = int(writer.done.sum())
    failed: list[tuple[int, BadImage]] = []
    todo = writer.todo
    started = time.perf_counter()
    if len(todo):
        total = len(file_ids)
        with progress_bar(f"Extracting {job.label}", total, enabled=progress, completed=total - len(todo)) as advance:
            try:
                for batch in engine.codes(job, todo):
                    writer.write(batch.rows, batch.codes)
                    failed += batch.failed
                    advance(len(batch.rows) + len(batch.failed))
                    if on_batch:
                        writer.sync()  # the hook may stop the run: what it was told is stored, is
                        on_batch(int(writer.done.sum()), total)
            finally:
                writer.sync()
                writer.save_clock()
    elapsed = time.perf_counter() - started
    return Computed(writer, len(todo) - len(failed), reused, failed, elapsed, writer.seconds_before, ids)


def _seeded_writer(out: Path, job: CodeJob, ids: np.ndarray) -> FeatureWriter:
    """The writer of these files' codes holding every row already made (`seconds_before`: the time they took).

    Rows come from an interrupted run of the same files (resumed), the last published features,
    and an interrupted run over other files (salvaged); each copy skips the rows already there.
    """
    previous = _previous_rows(out, job.key, ids)
    covered = previous is not None and len(previous.pairs) == len(ids)
    dim = previous.dim if previous is not None and covered else job.dim
    key = writer_key(job.key, ids)
    salvaged = salvage(out / CACHE_DIR, key, ids, job.key)
    writer = FeatureWriter(out / CACHE_DIR, key, len(ids), dim, ids, job.key)
    if previous is not None:
        writer.copy_from(previous.path, previous.pairs, previous.seconds * len(previous.pairs) / max(previous.rows, 1))
    if salvaged is not None:
        writer.copy_from(salvaged.path, salvaged.pairs, salvaged.seconds)
        salvaged.discard()
    return writer


class _Previous(NamedTuple):
    path: Path
    rows: int
    dim: int
    pairs: np.ndarray  # (new row, old row)
    seconds: float


def _previous_rows(out: Path, spec_key: str, ids: np.ndarray) -> _Previous | None:
    """Rows of the last published features with the same extractor, found by the digests of their file ids.

    `rows.json` is removed before `features.npy` is replaced and written again right after
    `rows-ids.npy`, so whenever it exists both describe the rows of `features.npy`. A publish
    cut short after it replaced `features.npy` is finished first.
    """
    cache = out / CACHE_DIR
    finish_publishing(out)
    try:
        index = artifacts.read_object(cache / ROWS_FILE)
        if index["spec_key"] != spec_key:
            return None
        (rows, dim), _ = npy_layout(out / CODES_FILE)
        seconds = float(index.get("seconds", 0.0))
        # folders published before rows-ids.npy listed the ids themselves
        old = id_digests(index["file_ids"]) if "file_ids" in index else np.load(cache / ROW_IDS_FILE)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pairs = matching_rows(old[:rows], ids)
    return _Previous(out / CODES_FILE, rows, dim, pairs, seconds) if len(pairs) else None
