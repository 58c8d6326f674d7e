"""`extract`: a folder of images in, one CNN code per image out.

`extract()` composes three steps, so engines differ only in where the work runs:

    the_plan = plan(dataset, out, ...)                 # check every file, hash, split: before any network
    done = compute_codes(out, job, file_ids, engine)   # rows reused or resumed, the engine's batches for the rest
    publish_folder(out, ...)                           # atomic outputs, meta.json last
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.codes.duplicates import DUPLICATES_FILE, SHEET_FILE, write_duplicates
from cnncodes.codes.engines.job import CodeJob
from cnncodes.codes.engines.local import make_engine
from cnncodes.codes.features import load_features
from cnncodes.codes.layout import (
    CACHE_DIR,
    CODES_FILE,
    DIGESTED,
    GROUPS_FILE,
    META_FILE,
    Provenance,
    forget_rows,
    intact_rows,
    publish_folder,
    record_locations,
    unlike_published,
    up_to_date,
)
from cnncodes.codes.meta import validate_meta
from cnncodes.codes.plan import Plan, check_out, discover_data, plan
from cnncodes.codes.reading import Files
from cnncodes.codes.resume import Computed, compute_codes
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core import files as artifacts
from cnncodes.core.errors import CnnCodesError, check_types, first_line
from cnncodes.core.progress import warn
from cnncodes.data.split import (
    DEFAULT_DUP_THRESHOLD,
    DEFAULT_FRACTIONS,
    check_dup_threshold,
    format_fractions,
    parse_fractions,
)
from cnncodes.runtime import quantize
from cnncodes.runtime.runners import check_runtime


@dataclass(kw_only=True)
class ExtractResult:
    """What `extract` produced, for the CLI's summary and for notebooks."""

    out: Path
    n_images: int
    dim: int
    classes: list[str]
    counts: dict[str, int]
    rejected: list[tuple[str, str, str]]  # layout.REJECTED_COLUMNS
    computed: int
    reused: int
    seconds: float
    images_per_second: float | None
    up_to_date: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_meta(cls, out: Path, meta: dict[str, Any], **run: Any) -> ExtractResult:
        """The result of a run whose `meta.json` holds `meta`.

        Args:
            out: the features folder.
            meta: its meta.json.
            run: what this run itself did (`rejected`, `computed`, `reused`, `seconds`, ...).

        Returns:
            The result.
        """
        counts = meta["split"]["counts"]
        return cls(out=out, n_images=meta["n_images"], dim=meta["dim"], classes=meta["classes"], counts=counts, **run)


def extract(
    data: Path | str,
    out: Path | str,
    spec: ExtractorSpec | None = None,
    *,
    batch_size: int = 32,
    split: str | Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    workers: int | None = None,
    runtime: str = "onnx",
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Write CNN codes of every usable image in `data` to `out` (docs/guide/extract.md lists the files).

    Bad files are skipped and listed in `rejected.csv`; re-running with the same data and
    settings recomputes nothing, and an interrupted run resumes where it stopped.

    Args:
        data: a class-per-folder directory or a `path,label` CSV, local or `s3://…`.
        out: the features folder (created if missing).
        spec: the extractor (`ExtractorSpec.create(...)`; default: `ExtractorSpec.create()`, MobileNetV2).
        batch_size: images per forward pass.
        split: train,val,test fractions.
        seed: the split's hash seed.
        dup_threshold: pHash bits within which two images are duplicates (0-16; -1 turns it off).
        workers: decoding threads locally, actors on Ray.
        runtime: `onnx` (default) or `keras`.
        progress: rich progress bars.
        engine: `local` or `ray`.
        address: a Ray cluster (else `RAY_ADDRESS`, else a new local one).
        on_batch: `on_batch(done, total)` after each batch of codes is safely stored, to follow a
            run from a notebook or stop it (raise KeyboardInterrupt) as Ctrl-C would.

    Returns:
        What the run produced and did.

    Raises:
        CnnCodesError: for a wrong argument, or data without a usable image in some class.
    """
    started = time.perf_counter()
    check_types(
        spec=(spec, (ExtractorSpec, type(None))),
        batch_size=(batch_size, int),
        seed=(seed, int),
        dup_threshold=(dup_threshold, int),
    )
    if batch_size < 1:
        raise CnnCodesError(f"--batch-size must be at least 1 (got {batch_size})")
    check_runtime(runtime)
    if engine == "ray" and runtime == "keras":
        raise CnnCodesError("--engine ray runs the network on ONNX Runtime on its workers: drop --runtime keras")
    check_dup_threshold(dup_threshold)
    fractions = parse_fractions(split)
    out = Path(out)
    check_out(data, out)
    dataset = discover_data(data)  # a missing or empty DATA fails before anything is written or downloaded
    stages = {"discover": round(time.perf_counter() - started, 3)}
    spec = spec or ExtractorSpec.create()
    quantize.check_runs_on(spec.precision, runtime)
    engine_started = time.perf_counter()
    where = make_engine(engine, workers, address)
    stages["engine"] = round(time.perf_counter() - engine_started, 3)
    with artifacts.exclusive(
        out / CACHE_DIR / "extract.lock",
        f"another cnncodes extract is writing to {out}: wait for it to finish, or give this one another --out",
    ):
        settings = {"fractions": fractions, "seed": seed, "dup_threshold": dup_threshold}  # they decide groups.npy
        the_plan = plan(
            dataset,
            out,
            fractions=fractions,
            seed=seed,
            dup_threshold=dup_threshold,
            workers=workers,
            progress=progress,
            engine=where,
        )
        spec = spec.calibrated(the_plan.train_files())  # names, not a Path per train image, none kept
        subsets = the_plan.split
        run_key = artifacts.sha256_json([spec.key, the_plan.file_ids, subsets.labels, subsets.subsets, settings])
        published = _verified(out)
        if published is not None:
            _warn_if_split_again(out, published["split"], settings, subsets.fingerprint)
        if published is not None and up_to_date(published, run_key, len(the_plan.usable)):
            meta = record_locations(out, published, data=str(the_plan.usable.root), weights_file=spec.weights_file)
            _list_duplicates(out, the_plan)
            return _unchanged(out, meta, the_plan, time.perf_counter() - started)
        paths = Files(the_plan.usable.root, the_plan.usable.paths)
        job = CodeJob(spec=spec, runtime=runtime, paths=paths, batch_size=batch_size)
        done = compute_codes(out, job, the_plan.file_ids, where, progress=progress, on_batch=on_batch)
        provenance = Provenance(
            spec=spec,
            runtime=runtime,
            engine=where.describe(),
            run_key=run_key,
            settings=settings,
            stage_seconds={**stages, **the_plan.seconds, "codes": round(done.seconds, 3)},
            images_per_second=done.images_per_second,
            since=started - done.earlier_seconds,
        )
        return _publish(out, the_plan, done, provenance)


# The split's settings and the flags that set them, as a re-split's warning names them.
_SPLIT_FLAGS = {"fractions": "--split", "seed": "--seed", "dup_threshold": "--dup-threshold"}


def _warn_if_split_again(out: Path, before: dict[str, Any], settings: dict[str, Any], fingerprint: str) -> None:
    """Warn when other split settings than the folder's make another split: runs fitted on it stop comparing.

    A default that changed between versions (`--dup-threshold`) would otherwise re-split a folder silently.
    """
    if before["fingerprint"] == fingerprint:
        return
    changed = [
        f"{flag} {_shown(before[key])} before, {_shown(settings[key])} now"
        for key, flag in _SPLIT_FLAGS.items()
        if _shown(before[key]) != _shown(settings[key])
    ]
    if changed:
        warn(
            f"{out} is split again ({'; '.join(changed)}): runs fitted on its earlier split do not compare with "
            "runs fitted on this one; give the earlier values to keep that split"
        )


def _shown(value: Any) -> str:
    """A split setting as its flag takes it: fractions as 0.7,0.15,0.15."""
    return format_fractions(value) if isinstance(value, (list, tuple)) else str(value)


def _verified(out: Path) -> dict[str, Any] | None:
    """meta.json, when the files it records are as it recorded them; else None, and the rows that are not are forgotten.

    This run then writes again what was damaged (a file cut short, edited or deleted), with
    every intact row reused: a damaged folder is never called up to date, nor its rows reused.
    """
    try:
        meta = validate_meta(artifacts.read_object(out / META_FILE), out / META_FILE, advice="")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, CnnCodesError) as e:  # its records of the files are lost: no row is trusted
        warn(f"{out} is not as extract left it ({first_line(e)}): its files are written again, every row computed")
        forget_rows(out, np.zeros(0, dtype=bool))
        return None
    intact = intact_rows(out, meta)
    changed = unlike_published(out, meta, DIGESTED)
    if not intact.all() and CODES_FILE not in changed:
        changed.insert(0, CODES_FILE)
    problem = f"{', '.join(changed)} changed" if changed else None
    if problem is None and "files" not in meta:  # published before the digests: what its contents can be checked for
        try:
            load_features(out)
        except CnnCodesError:
            problem = "its files do not belong together"
    if problem is None:
        return meta
    warn(
        f"{out} is not as extract left it ({problem}): its files are written again, "
        f"reusing the {int(intact.sum())} intact rows"
    )
    forget_rows(out, intact)
    return None


def _list_duplicates(out: Path, the_plan: Plan) -> None:
    """Write duplicates.csv and .png into an up-to-date folder that lacks them (published by an earlier version)."""
    if not all((out / name).is_file() for name in (DUPLICATES_FILE, SHEET_FILE)):
        usable = the_plan.usable
        groups = np.load(out / GROUPS_FILE)  # verified as published: the rows are the plan's usable images
        write_duplicates(
            out, files=Files(usable.root, usable.paths), labels=usable.labels, groups=groups, bits=the_plan.hashes
        )


def _unchanged(out: Path, meta: dict[str, Any], the_plan: Plan, seconds: float) -> ExtractResult:
    """The result of a run that found its codes up to date (`meta`, its meta.json): every row reused, none computed."""
    return ExtractResult.from_meta(
        out,
        meta,
        rejected=the_plan.rejected,
        warnings=the_plan.split.warnings,
        computed=0,
        reused=meta["n_images"],
        seconds=seconds,
        images_per_second=None,
        up_to_date=True,
    )


def _publish(out: Path, the_plan: Plan, done: Computed, provenance: Provenance) -> ExtractResult:
    """Publish the run's codes and what the folder lists of them; the result says what this run did."""
    rejected = the_plan.rejected + done.failed_paths(the_plan.usable.paths)
    meta = publish_folder(
        out,
        writer=done.writer,
        ids=done.ids,
        usable=the_plan.usable,
        split=the_plan.split,
        groups=the_plan.groups,
        hashes=the_plan.hashes,
        rejected=rejected,
        provenance=provenance,
    )
    return ExtractResult.from_meta(
        out,
        meta,
        rejected=rejected,
        warnings=the_plan.split.warnings,
        computed=done.computed,
        reused=done.reused,
        seconds=meta["elapsed_seconds"],
        images_per_second=meta["images_per_second"],
    )
