"""The files of a features folder, and how `extract` publishes them so that a kill never leaves a mix.

`load_features` reads what is written here: `features.npy` (the codes), `labels.npy`,
`groups.npy`, `split.csv`, `rejected.csv`, `duplicates.csv` and `duplicates.png` (`codes.duplicates`),
and `meta.json`, written last, so a reader that finds it finds a complete set; it records what
each file is (`DIGESTED`), so a file damaged later is told from its original. `CACHE_DIR` holds
what the next run reuses, among it the index of the rows of `features.npy` (`ROW_IDS_FILE`, `ROWS_FILE`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.codes.duplicates import write_duplicates
from cnncodes.codes.meta import FEATURES_FORMAT, validate_meta
from cnncodes.codes.reading import Files
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.codes.store import FeatureWriter, npy_layout
from cnncodes.core import files as artifacts
from cnncodes.core.writes import says_where
from cnncodes.data.ingest import Dataset
from cnncodes.data.split import Split, label_indices

META_FILE, CODES_FILE, LABELS_FILE = "meta.json", "features.npy", "labels.npy"
GROUPS_FILE, SPLIT_FILE, REJECTED_FILE = "groups.npy", "split.csv", "rejected.csv"
CACHE_DIR = ".cache"
# In CACHE_DIR: the digest (`resume.id_digests`) of each row's file id in features.npy, so the next run reuses its
# rows, and the index saying which extractor made them and what they took (present only while both describe
# features.npy).
ROW_IDS_FILE, ROWS_FILE = "rows-ids.npy", "rows.json"
# rejected.csv: why each file was skipped, and the category (`BadImage.category`) summaries count.
REJECTED_COLUMNS = ("path", "reason", "category")
# meta.json's `files`: the size and SHA-256 of each of these as published, features.npy's also per part
# of about PART_BYTES (whole rows), so a damaged file is told from its original and its intact rows are reused.
DIGESTED = (CODES_FILE, LABELS_FILE, GROUPS_FILE, SPLIT_FILE)
PART_BYTES = 1 << 26
# A row id no file has (`resume.id_digests` are BLAKE2b digests): the next run computes that row again.
_NO_ID = b"\0" * 16


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """How a folder's codes were made, as its meta.json records it."""

    spec: ExtractorSpec
    runtime: str
    engine: dict[str, Any]  # `Engine.describe()`
    run_key: str  # equal keys: the same codes of the same files in the same split
    settings: dict[str, Any]  # the split's: fractions, seed, dup_threshold
    stage_seconds: dict[str, float]  # before publishing
    images_per_second: float | None  # while computing codes; None when none were computed
    since: float  # the `time.perf_counter()` at which the codes began, earlier runs' share included


def skipped_summary(rejected: Sequence[tuple[str, str, str]], listing: Path) -> str:
    """The one line that says how many files were skipped, by category, and where they are listed.

    Args:
        rejected: rows of rejected.csv (`REJECTED_COLUMNS`).
        listing: where they are listed.

    Returns:
        The line.
    """
    reasons = Counter(category for _, _, category in rejected)
    by_category = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
    return f"skipped {len(rejected)} file(s) ({by_category}): see {listing}"


def up_to_date(meta: dict[str, Any], run_key: str, n_usable: int) -> bool:
    """Whether a folder holds this run's codes, one for every usable image (one that failed is tried again).

    Args:
        meta: its meta.json, its files checked to be as published.
        run_key: the key of the run about to start.
        n_usable: how many images it would code.

    Returns:
        True when the run has nothing to do.
    """
    return meta.get("run_key") == run_key and meta.get("n_images") == n_usable


def file_digests(out: Path, row_bytes: int) -> dict[str, dict[str, Any]]:
    """meta.json's `files`: what each of `DIGESTED` is as published, read once.

    Args:
        out: the features folder, its outputs written.
        row_bytes: the bytes of one row of features.npy.

    Returns:
        Each file's size and SHA-256; features.npy's also its parts' (`intact_rows`).
    """
    codes = out / CODES_FILE
    part_rows = max(1, PART_BYTES // row_bytes)
    whole, parts = artifacts.sha256_parts(codes, offset=npy_layout(codes)[1], part_bytes=part_rows * row_bytes)
    others = {
        name: {"bytes": (out / name).stat().st_size, "sha256": artifacts.sha256_file(out / name)}
        for name in DIGESTED[1:]
    }
    parted = {"part_rows": part_rows, "parts_sha256": parts}
    return {CODES_FILE: {"bytes": codes.stat().st_size, "sha256": whole, **parted}, **others}


def unlike_published(out: Path, meta: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The files among `names` that are not what meta.json recorded at publish: another size or SHA-256.

    features.npy is compared by size alone here, as reading it whole is `intact_rows`'s work. A folder
    published before the digests were recorded has none: nothing is listed.

    Args:
        out: the features folder.
        meta: its meta.json.
        names: the files to compare.

    Returns:
        The names of the files that differ or are missing, in the order given.
    """
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        return []
    changed = []
    for name in (n for n in names if n in recorded):
        entry = recorded[name]
        try:
            same = (out / name).stat().st_size == entry["bytes"] and (
                name == CODES_FILE or artifacts.sha256_file(out / name) == entry["sha256"]
            )
        except (OSError, KeyError, TypeError):
            same = False
        if not same:
            changed.append(name)
    return changed


def intact_rows(out: Path, meta: dict[str, Any]) -> np.ndarray:
    """Which rows of features.npy are as published: those of the parts whose SHA-256 is the recorded one.

    A folder published before the digests were recorded has its rows all intact when the file has
    the shape and size meta.json gives it, else none.

    Args:
        out: the features folder.
        meta: its meta.json.

    Returns:
        A boolean per row that meta.json counts.
    """
    n = meta.get("n_images")
    if not isinstance(n, int) or n < 0:
        return np.zeros(0, dtype=bool)
    intact = np.zeros(n, dtype=bool)
    path = out / CODES_FILE
    try:
        width = meta["dim"] * (meta["extractor"].get("views") or 1)
        shape, offset = npy_layout(path)
        entry = meta["files"][CODES_FILE] if "files" in meta else None
        if shape != (n, width):
            return intact
        if entry is None:
            intact[:] = path.stat().st_size == offset + n * width * 4
            return intact
        part_rows = int(entry["part_rows"])
        whole, parts = artifacts.sha256_parts(path, offset=offset, part_bytes=part_rows * width * 4)
        if path.stat().st_size == entry["bytes"] and whole == entry["sha256"]:
            intact[:] = True
            return intact
        for i, (found, made) in enumerate(zip(parts, entry["parts_sha256"])):
            intact[i * part_rows : (i + 1) * part_rows] = found == made
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        intact[:] = False
    return intact


def forget_rows(out: Path, intact: np.ndarray) -> None:
    """Keep the next run from reusing rows of features.npy that are not as published: they are computed again.

    Their ids in `ROW_IDS_FILE` become one no file has; an index without that file (of an earlier
    version) is forgotten whole.

    Args:
        out: the features folder.
        intact: a boolean per row of features.npy (`intact_rows`); none at all: every row is forgotten.
    """
    cache = out / CACHE_DIR
    if len(intact) and intact.all():
        return
    try:
        ids = np.load(cache / ROW_IDS_FILE)
        kept = "file_ids" not in artifacts.read_object(cache / ROWS_FILE) and len(ids) == len(intact)
    except (OSError, ValueError):
        kept = False
    if not kept or not intact.any():
        (cache / ROWS_FILE).unlink(missing_ok=True)
        return
    ids[~intact] = _NO_ID
    artifacts.write_npy_atomic(cache / ROW_IDS_FILE, ids)


def record_locations(out: Path, meta: dict[str, Any], *, data: str, weights_file: str | None) -> dict[str, Any]:
    """Keep `meta.json` saying where the images and weights file are when they moved and the codes did not change.

    The codes' identity leaves both out (a moved folder keeps its files), but the models fitted on
    them record both: `predict` finds the weights there, the HTML report the images.

    Args:
        out: the features folder.
        meta: its meta.json, as read.
        data: where the images are now.
        weights_file: where the weights file is now.

    Returns:
        meta.json as it now is.
    """
    if meta["data"] != data or meta["extractor"].get("weights_file") != weights_file:
        meta["data"], meta["extractor"]["weights_file"] = data, weights_file
        artifacts.write_json_atomic(out / META_FILE, meta)
    return meta


def finish_publishing(out: Path) -> None:
    """Finish the renames of a publish killed after it replaced `features.npy` (the new `rows.json` names it).

    Args:
        out: the features folder.
    """
    cache = out / CACHE_DIR
    try:
        pending = artifacts.read_object(cache / f"{ROWS_FILE}.new")
        done = pending["features"] == _identity(out / CODES_FILE)
    except (OSError, ValueError, KeyError):
        return
    if done:
        if (cache / f"{ROW_IDS_FILE}.new").is_file():
            os.replace(cache / f"{ROW_IDS_FILE}.new", cache / ROW_IDS_FILE)
        os.replace(cache / f"{ROWS_FILE}.new", cache / ROWS_FILE)


def publish_folder(
    out: Path,
    *,
    writer: FeatureWriter,
    ids: np.ndarray,
    usable: Dataset,
    split: Split,
    groups: np.ndarray,
    hashes: np.ndarray,
    rejected: list[tuple[str, str, str]],
    provenance: Provenance,
) -> dict[str, Any]:
    """Replace the outputs with the writer's finished rows and what the folder lists of them.

    The order keeps every kill recoverable: the new `rows-ids.npy` and `rows.json` are
    written beside the old ones (naming the file of finished rows), `meta.json` and `rows.json`
    go, the finished rows become `features.npy`, the new row files take the old ones' names
    (three renames, finished by the next run if cut short), and only then is the unfinished
    state forgotten; `meta.json` goes last, so a reader that finds it finds a complete set.
    A run killed in between reuses every row.

    Args:
        out: the features folder.
        writer: the run's codes; its rows not finished (files that failed) are left out.
        ids: the digest of each row's file id.
        usable: the usable images, a row each.
        split: their split.
        groups: their duplicate groups.
        hashes: their perceptual hashes (`split.hash_bits`), for the distances duplicates.csv lists.
        rejected: the files left out, as rejected.csv lists them.
        provenance: how the codes were made.

    Returns:
        The meta.json record.
    """
    published = time.perf_counter()
    finished, kept = writer.finished_file()
    cache = out / CACHE_DIR
    artifacts.write_npy_atomic(cache / f"{ROW_IDS_FILE}.new", ids[kept])
    artifacts.write_json_atomic(
        cache / f"{ROWS_FILE}.new",
        {"spec_key": provenance.spec.key, "seconds": published - provenance.since, "features": _identity(finished)},
    )
    (out / META_FILE).unlink(missing_ok=True)
    (cache / ROWS_FILE).unlink(missing_ok=True)  # rows.json must never describe other features
    with says_where(out / CODES_FILE, finished):
        os.replace(finished, out / CODES_FILE)
    os.replace(cache / f"{ROW_IDS_FILE}.new", cache / ROW_IDS_FILE)
    os.replace(cache / f"{ROWS_FILE}.new", cache / ROWS_FILE)
    writer.discard()
    final = _keep_rows(split, kept)
    artifacts.write_npy_atomic(out / LABELS_FILE, label_indices(final.labels, usable.classes))
    final_groups = np.unique(groups[kept], return_inverse=True)[1].astype(np.int64)
    artifacts.write_npy_atomic(out / GROUPS_FILE, final_groups)
    write_duplicates(
        out, files=Files(usable.root, final.paths), labels=final.labels, groups=final_groups, bits=hashes[kept]
    )
    final.write_csv(out / SPLIT_FILE)
    artifacts.write_csv_atomic(out / REJECTED_FILE, REJECTED_COLUMNS, rejected)
    meta = _meta(usable, final, writer.dim // (provenance.spec.views or 1), provenance)
    meta["files"] = file_digests(out, writer.dim * 4)
    meta["stage_seconds"] = {**provenance.stage_seconds, "publish": round(time.perf_counter() - published, 3)}
    artifacts.write_json_atomic(out / META_FILE, validate_meta(meta, out / META_FILE))
    return meta


def _identity(path: Path) -> list[int]:
    """What tells a file from its replacement (a rename keeps all of it): inode, size, modification time.

    Not the device number, which a network or overlay file system may change when it is mounted again.
    """
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _keep_rows(the_split: Split, kept: np.ndarray) -> Split:
    if len(kept) == len(the_split.paths):
        return the_split
    return Split(
        [the_split.paths[i] for i in kept],
        [the_split.labels[i] for i in kept],
        [the_split.subsets[i] for i in kept],
        the_split.n_duplicate_groups,
        the_split.warnings,
    )


def _meta(usable: Dataset, final: Split, dim: int, provenance: Provenance) -> dict[str, Any]:
    rate = provenance.images_per_second
    return {
        "format": FEATURES_FORMAT,
        "data": str(usable.root),
        "classes": usable.classes,
        "n_images": len(final.paths),
        "dim": dim,
        "extractor": provenance.spec.pinned().to_dict(),
        "runtime": provenance.runtime,
        "engine": provenance.engine,
        "split": {
            **provenance.settings,
            "fingerprint": final.fingerprint,
            "duplicate_groups": final.n_duplicate_groups,
            "counts": final.counts(),
        },
        "run_key": provenance.run_key,
        "versions": artifacts.package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(time.perf_counter() - provenance.since, 3),
        "images_per_second": round(rate, 2) if rate else None,
    }
