"""`extract`: a folder of images in, one CNN code per image out.

The work is a pipeline of three pieces that know nothing of each other, so a
distributed engine can compose them the same way (one reader and writer per shard,
one runner per worker):

    reader = ImageReader(paths, size)          # files -> batches of uint8 pixels
    runner = spec.runner(weights, "onnx")      # pixels -> codes (ONNX Runtime or Keras)
    writer = FeatureWriter(dir, key, n, dim)   # codes -> rows of a memory-mapped .npy

`extract()` adds what a user needs around them: checking every file before heavy work,
the leak-safe split, caching and resuming, and atomic outputs.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from filelock import FileLock, Timeout
from numpy.lib.format import open_memmap

from . import artifacts, quantize
from .backbones import POOLINGS, get_backbone
from .errors import CnnCodesError
from .ingest import RESIZE_MODES, BadImage, Check, Dataset, check_images, discover, load_square
from .progress import progress_bar, warn
from .runtime import MirrorAveraged, Runner, cache_record, check_runtime, make_runner
from .split import DEFAULT_DUP_THRESHOLD, DEFAULT_FRACTIONS, Split, make_split, parse_fractions
from .weights import Weights

FEATURES_FORMAT = "cnncodes.features/1"
# Bump when the way an extractor is built changes, so no cache keeps codes of the old build.
EXTRACTOR_FORMAT = 1
CACHE_DIR = ".cache"


@dataclass(frozen=True)
class ExtractorSpec:
    """Everything that decides the code of an image; `predict` rebuilds the extractor from it."""

    backbone: str
    layer: str
    pooling: str
    image_size: int
    resize: str
    preprocessing: str
    weights: str
    weights_sha256: str | None = None
    weights_file: str | None = None
    flip: bool = False
    # fp32, or int8: a quantized copy of the ONNX model, calibrated on train images only.
    precision: str = "fp32"
    # int8 only: {"n"} as asked, then the images chosen ("images", "holdout") and their "fingerprint".
    calibration: dict[str, Any] | None = None
    # Recorded by the cache when the model was made: the configuration int8 chose and its agreement with fp32.
    quantization: dict[str, Any] | None = None
    # The model's outputs on the probe batch (runtime.fingerprint): pins the cached model to these codes.
    probe: list[float] | None = None

    @classmethod
    def create(
        cls,
        backbone: str = "mobilenetv2",
        layer: str | None = None,
        pooling: str = "avg",
        image_size: int | None = None,
        resize: str = "crop",
        weights: str = "imagenet",
        flip: bool = False,
        precision: str = "fp32",
        calibration: int = quantize.DEFAULT_CALIBRATION,
        runtime: str = "onnx",
    ) -> tuple[ExtractorSpec, Weights]:
        """Validate the user's choices and resolve the weights file (no TensorFlow needed)."""
        quantize.check_precision(precision, runtime, calibration)
        entry = get_backbone(backbone)
        layer = layer or entry.default_layer
        if pooling not in POOLINGS:
            raise CnnCodesError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        if flip and pooling == "flatten" and not entry.needs_top(layer):
            raise CnnCodesError("--flip averages the codes of an image and of its mirror image, which only makes sense "
                                "for pooled codes: use --pooling avg or max")
        if resize not in RESIZE_MODES:
            raise CnnCodesError(f"unknown resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}")
        size = image_size or entry.default_size
        entry.check_size(size, layer)
        resolved = entry.resolve_weights(weights, layer)
        spec = cls(
            backbone=entry.name, layer=layer, pooling="none" if entry.needs_top(layer) else pooling,
            image_size=size, resize=resize, preprocessing=entry.preprocessing, weights=resolved.kind,
            weights_sha256=resolved.sha256, weights_file=str(resolved.path) if resolved.path else None, flip=flip,
            precision=precision, calibration={"n": calibration} if precision == "int8" else None,
        )
        return spec, resolved

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractorSpec:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def network_key(self) -> str:
        """Equal keys mean equal networks. Untrained weights depend on Keras's initialisers."""
        ignored = ("weights_file", "flip", "precision", "calibration", "quantization", "probe")
        identity = {k: v for k, v in self.to_dict().items() if k not in ignored} | {"format": EXTRACTOR_FORMAT}
        if self.weights == "none":
            identity["keras"] = artifacts.package_versions().get("keras")
        return artifacts.sha256_json(identity)

    @property
    def model_key(self) -> str:
        """Equal keys mean equal models run by the runtime: the network, quantized with its calibration set."""
        if self.precision == "fp32":
            return self.network_key
        return artifacts.sha256_json([self.network_key, self.precision, self.calibration_fingerprint, quantize.FORMAT])

    @property
    def calibration_fingerprint(self) -> str | None:
        return (self.calibration or {}).get("fingerprint")

    @property
    def key(self) -> str:
        """Equal keys mean equal codes; fp32 codes without --flip keep the keys they had before either existed."""
        return artifacts.sha256_json([self.model_key, "flip"]) if self.flip else self.model_key

    def calibrated(self, train: Sequence[Path]) -> ExtractorSpec:
        """For int8, the calibration and held-out images, chosen among `train` (never val or test images)."""
        if self.precision == "fp32":
            return self
        n = (self.calibration or {}).get("n", quantize.DEFAULT_CALIBRATION)
        return replace(self, calibration=quantize.calibration_set(train, n))

    def pinned(self) -> ExtractorSpec:
        """This spec with what the cache recorded when it made the model: the probe fingerprint, int8's choice."""
        record = cache_record(self.model_key) or {}
        return replace(self, probe=record.get("probe", self.probe),
                       quantization=record.get("quantization", self.quantization))

    def find_weights(self, override: str | None = None) -> Weights:
        """The weights these codes were made with, found again (or at `override`) and checked by SHA-256."""
        if self.weights == "none":
            return Weights("none")
        choice = override or ("imagenet" if self.weights == "imagenet" else self.weights_file)
        found = get_backbone(self.backbone).resolve_weights(choice, self.layer)
        if found.sha256 != self.weights_sha256:
            raise CnnCodesError(
                f"the weights {found.path or choice} are not the ones this model was made with ({self.weights_file}, "
                f"SHA-256 {self.weights_sha256}): give the right file with --weights PATH")
        return found

    def build(self, weights: Weights):
        """The Keras extractor: uint8 pixels in, codes out."""
        return get_backbone(self.backbone).build_extractor(self.image_size, self.layer, self.pooling, weights)

    def runner(self, weights: Weights, runtime: str = "onnx") -> Runner:
        """The extractor on `runtime`, at its precision; with a cached ONNX model, TensorFlow is never loaded.

        On a cache miss the network is converted in a child process (and quantized for int8), so
        calling this ahead of time, e.g. in a container build, prepares the cache.
        """
        quantize.check_precision(self.precision, runtime)
        build = partial(self.build, weights)  # picklable: the conversion runs in a child process
        if self.precision == "int8":
            found: Runner = quantize.int8_runner(self, build, notice=warn)
        else:
            found = make_runner(build, self.network_key, runtime, notice=warn, pin=self.probe, label=self.backbone)
        return MirrorAveraged(found) if self.flip else found

    def prepare(self, weights: Weights | None = None) -> None:
        """Convert (and for int8 quantize) this extractor into the cache ahead of time, e.g. in a container build."""
        self.runner(weights or self.find_weights())


@dataclass
class Batch:
    """Decoded images of one batch; files that failed to decode are in `failed`."""

    rows: np.ndarray
    pixels: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)


class ImageReader:
    """Decodes files into batches of `size`×`size` pixels on worker threads, a few batches ahead.

    Pillow releases the GIL while it decodes and resizes, so threads overlap with each
    other and with the forward pass that consumes the batches.
    """

    def __init__(self, paths: Sequence[Path], size: int, resize: str = "crop", batch_size: int = 32,
                 workers: int | None = None, prefetch: int = 2):
        self.paths = paths
        self.size = size
        self.resize = resize
        self.batch_size = batch_size
        self.workers = workers or os.cpu_count() or 2
        self.prefetch = prefetch

    def __call__(self, rows: Sequence[int]) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=self.workers)
        pending: deque = deque()
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                pending.append((chunk, [pool.submit(self._load, self.paths[r]) for r in chunk]))
                if len(pending) > self.prefetch:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, path: Path) -> np.ndarray | str:
        try:
            return load_square(path, self.size, self.resize)
        except BadImage as e:
            return str(e)

    def _collect(self, chunk: Sequence[int], futures: list) -> Batch:
        results = [f.result() for f in futures]
        good = [(row, r) for row, r in zip(chunk, results) if isinstance(r, np.ndarray)]
        failed = [(row, r) for row, r in zip(chunk, results) if isinstance(r, str)]
        pixels = np.stack([r for _, r in good]) if good else np.empty((0, self.size, self.size, 3), np.uint8)
        return Batch(np.array([row for row, _ in good], dtype=np.int64), pixels, failed)


class FeatureWriter:
    """Stores code rows in a memory-mapped `.npy` as they come: memory is bounded by a batch.

    Which rows are done is saved after every batch, so a killed run resumes where it
    stopped; the state is tied to `key`, so different settings never reuse its rows. The
    finished array becomes visible only through an atomic rename (`publish`).
    """

    def __init__(self, work_dir: Path, key: str, n_rows: int, dim: int):
        work_dir.mkdir(parents=True, exist_ok=True)
        self._data = work_dir / "partial.npy"
        self._done = work_dir / "partial-done.npy"
        self._state = work_dir / "partial.json"
        self.dim = dim
        expected = {"key": key, "rows": n_rows, "dim": dim}
        if not self._resume(expected):
            self._state.unlink(missing_ok=True)  # first, so a crash below cannot pair old state with new rows
            self.codes = open_memmap(self._data, mode="w+", dtype=np.float32, shape=(n_rows, dim))
            self.done = np.zeros(n_rows, dtype=bool)
            artifacts.write_npy_atomic(self._done, self.done)
            artifacts.write_json_atomic(self._state, expected)
        self.resumed = int(self.done.sum())

    def _resume(self, expected: dict) -> bool:
        try:
            if artifacts.read_json(self._state) != expected:
                return False
            codes = np.load(self._data, mmap_mode="r+")
            done = np.load(self._done)
        except (OSError, ValueError):
            return False
        if codes.shape != (expected["rows"], expected["dim"]) or done.shape != (expected["rows"],):
            return False
        self.codes, self.done = codes, done
        return True

    @property
    def todo(self) -> np.ndarray:
        return np.flatnonzero(~self.done)

    def write(self, rows: np.ndarray, codes: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self.codes[rows] = codes
        self.codes.flush()
        self.done[rows] = True
        artifacts.write_npy_atomic(self._done, self.done)

    def copy_from(self, source: np.ndarray, pairs: Sequence[tuple[int, int]]) -> None:
        """Take rows (new, old) from an earlier run's features instead of recomputing them."""
        for start in range(0, len(pairs), 1024):
            chunk = np.array(pairs[start:start + 1024], dtype=np.int64).reshape(-1, 2)
            self.write(chunk[:, 0], source[chunk[:, 1]])

    def publish(self, dest: Path) -> np.ndarray:
        """Move the finished rows to `dest` atomically; returns which rows it holds."""
        kept = np.flatnonzero(self.done)
        self.codes.flush()
        if len(kept) == len(self.done):
            del self.codes
            os.replace(self._data, dest)
        else:
            self._publish_subset(dest, kept)
        self._state.unlink(missing_ok=True)
        self._done.unlink(missing_ok=True)
        self._data.unlink(missing_ok=True)
        return kept

    def _publish_subset(self, dest: Path, kept: np.ndarray) -> None:
        tmp = dest.with_name(f".{dest.name}.tmp")
        out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(kept), self.codes.shape[1]))
        for start in range(0, len(kept), 1024):
            out[start:start + 1024] = self.codes[kept[start:start + 1024]]
        out.flush()
        del out, self.codes
        os.replace(tmp, dest)


@dataclass
class ExtractResult:
    """What `extract` produced, for the CLI's summary and for notebooks."""

    out: Path
    n_images: int
    dim: int
    classes: list[str]
    counts: dict[str, int]
    rejected: list[tuple[str, str]]
    computed: int
    reused: int
    seconds: float
    images_per_second: float | None
    up_to_date: bool = False
    warnings: list[str] = field(default_factory=list)


def extract(
    data: Path | str,
    out: Path | str,
    *,
    backbone: str = "mobilenetv2",
    layer: str | None = None,
    pooling: str = "avg",
    weights: str = "imagenet",
    image_size: int | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    split: str | Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    workers: int | None = None,
    runtime: str = "onnx",
    flip: bool = False,
    progress: bool = True,
    precision: str = "fp32",
    calibration: int = quantize.DEFAULT_CALIBRATION,
) -> ExtractResult:
    """Write CNN codes of every usable image in `data` to `out` (see the README for the files).

    Bad files are skipped and listed in `rejected.csv`; re-running with the same data and
    settings recomputes nothing, and an interrupted run resumes where it stopped. `flip`
    averages each code with that of the mirror image (twice the forward passes). `precision`
    "int8" runs a quantized model calibrated on `calibration` train images (see the README).
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise CnnCodesError(f"--batch-size must be at least 1 (got {batch_size})")
    check_runtime(runtime)
    fractions = parse_fractions(split)
    spec, resolved = ExtractorSpec.create(backbone, layer, pooling, image_size, resize, weights, flip, precision,
                                          calibration, runtime)
    out = Path(out)
    dataset = discover(data)  # a missing or empty DATA fails before anything is written
    with _exclusive(out):
        usable, the_split, rejected, file_ids = plan(dataset, out, fractions, seed, dup_threshold, workers, progress)
        spec = spec.calibrated([usable.root / p for p, s in zip(the_split.paths, the_split.subsets) if s == "train"])
        run_key = artifacts.sha256_json([spec.key, file_ids, the_split.labels, the_split.subsets])
        if _up_to_date(out, run_key):
            return _result_from_meta(out, rejected, the_split.warnings, time.perf_counter() - started)

        paths = [usable.root / p for p in usable.paths]
        done = _compute_codes(out, spec, lambda: spec.runner(resolved, runtime), paths, file_ids,
                              batch_size, workers, progress)
        writer = done.writer
        kept = writer.publish(out / "features.npy.new")
        rejected += [(usable.paths[row], reason) for row, reason in done.failed]
        final = _keep_rows(the_split, kept)
        meta = _meta(usable, final, spec, runtime, run_key, writer.dim,
                     dict(fractions=fractions, seed=seed, dup_threshold=dup_threshold),
                     time.perf_counter() - started, done.computed / done.seconds if done.computed else None)
        _publish_outputs(out, final, meta, rejected, [file_ids[i] for i in kept], spec.key)
    return ExtractResult(out, len(final.paths), meta["dim"], meta["classes"], final.counts(), rejected, done.computed,
                         done.reused, meta["elapsed_seconds"], meta["images_per_second"], warnings=the_split.warnings)


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One extract at a time per features folder: two would interleave their rows.

    The lock is the operating system's (it dies with its process), so a killed run never
    leaves a stale lock behind.
    """
    (out / CACHE_DIR).mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / CACHE_DIR / "extract.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CnnCodesError(f"another cnncodes extract is writing to {out}: wait for it to finish, "
                            "or give this one another --out") from None
    try:
        yield
    finally:
        lock.release()


class Plan(NamedTuple):
    """The usable images of a dataset and their split, decided before any network runs."""

    usable: Dataset
    split: Split
    rejected: list[tuple[str, str]]
    file_ids: list[str]


def plan(dataset: Dataset, out: Path, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
         dup_threshold: int = DEFAULT_DUP_THRESHOLD, workers: int | None = None, progress: bool = True) -> Plan:
    """Check every image `discover` found, write `out/rejected.csv`, and split the usable ones.

    Stops with a `CnnCodesError` when a class, or the whole dataset, has no usable image.
    """
    all_ids = _file_ids(dataset)
    checks = _check(dataset, all_ids, out / CACHE_DIR, workers, progress)
    rejected = [(p, c.reason) for p, c in zip(dataset.paths, checks) if not c.ok]
    artifacts.write_csv_atomic(out / "rejected.csv", ("path", "reason"), rejected)
    usable = _require_usable(dataset, checks)
    the_split = make_split(usable.paths, usable.labels, [c.phash for c in checks if c.ok], fractions, seed, dup_threshold)
    return Plan(usable, the_split, rejected, [fid for fid, c in zip(all_ids, checks) if c.ok])


def _check(dataset: Dataset, ids: list[str], cache_dir: Path, workers: int | None, progress: bool) -> list[Check]:
    """Decode every file once (cached by path, size and mtime) to find the bad ones and hash the rest.

    The cache is saved every few thousand files, so an interrupted check resumes too.
    """
    cache_file = cache_dir / "checks.json"
    try:
        cache = artifacts.read_json(cache_file)
    except (OSError, ValueError):
        cache = {}
    todo = [i for i, fid in enumerate(ids) if fid not in cache]
    with progress_bar("Checking images", len(todo), enabled=progress and bool(todo)) as advance:
        for start in range(0, len(todo), 4096):
            chunk = todo[start:start + 4096]
            found = check_images([dataset.root / dataset.paths[i] for i in chunk], workers or os.cpu_count() or 2, advance)
            cache.update({ids[i]: [c.reason, c.phash] for i, c in zip(chunk, found)})
            artifacts.write_json_atomic(cache_file, {fid: cache[fid] for fid in ids if fid in cache})
    return [Check(*cache[fid]) for fid in ids]


def _file_ids(dataset: Dataset) -> list[str]:
    """A file's identity for caches: its path with its size and modification time."""
    ids = []
    for rel in dataset.paths:
        try:
            st = (dataset.root / rel).stat()
            ids.append(f"{rel}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            ids.append(f"{rel}|missing")
    return ids


def _require_usable(dataset: Dataset, checks: list[Check]) -> Dataset:
    keep = [i for i, c in enumerate(checks) if c.ok]
    if not keep:
        raise CnnCodesError(f"no usable image in {dataset.root}: all {len(dataset)} files were rejected (see rejected.csv)")
    usable = Dataset(dataset.root, [dataset.paths[i] for i in keep], [dataset.labels[i] for i in keep])
    empty = sorted(set(dataset.labels) - set(usable.labels))
    if empty:
        raise CnnCodesError(f"no usable image in class {', '.join(empty)}: add images or remove the folder")
    return usable


def _compute_codes(out, spec, make_runner, paths, file_ids, batch_size, workers, progress):
    """Fill a FeatureWriter: resume, reuse rows of an earlier run, then run the network on the rest."""
    previous = _previous_rows(out, spec.key, file_ids)
    runner = None
    dim = previous[0].shape[1] if previous else None
    if previous is None or len(previous[1]) < len(file_ids):
        runner = make_runner()
        dim = runner.dim
    run_key = artifacts.sha256_json([spec.key, file_ids])
    writer = FeatureWriter(out / CACHE_DIR, run_key, len(file_ids), dim)
    reused = 0
    if previous is not None and writer.resumed == 0:
        writer.copy_from(previous[0], previous[1])
        reused = len(previous[1])
    failed = []
    todo = writer.todo
    runner = runner or (make_runner() if len(todo) else None)
    started = time.perf_counter()
    if len(todo):
        reader = ImageReader(paths, spec.image_size, spec.resize, batch_size, workers)
        with progress_bar(f"Extracting {spec.backbone}/{spec.layer}", len(file_ids), enabled=progress,
                          completed=len(file_ids) - len(todo)) as advance:
            for batch in reader(todo):
                writer.write(batch.rows, runner(batch.pixels))
                failed += batch.failed
                advance(len(batch.rows) + len(batch.failed))
    computed = len(todo) - len(failed)
    return _Computed(writer, computed, reused + writer.resumed, failed, time.perf_counter() - started)


class _Computed(NamedTuple):
    writer: FeatureWriter
    computed: int
    reused: int
    failed: list[tuple[int, str]]
    seconds: float


def _previous_rows(out: Path, spec_key: str, file_ids: list[str]):
    """Rows of the last finished run with the same extractor, as (features, [(new, old)])."""
    try:
        index = artifacts.read_json(out / CACHE_DIR / "rows.json")
        if index["spec_key"] != spec_key or not (out / "meta.json").is_file():
            return None
        features = np.load(out / "features.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    old = {fid: i for i, fid in enumerate(index["file_ids"]) if i < len(features)}
    pairs = [(new, old[fid]) for new, fid in enumerate(file_ids) if fid in old]
    return (features, pairs) if pairs else None


def _up_to_date(out: Path, run_key: str) -> bool:
    try:
        meta = artifacts.read_json(out / "meta.json")
        return meta.get("run_key") == run_key and (out / "features.npy").is_file() and (out / "labels.npy").is_file()
    except (OSError, ValueError):
        return False


def _result_from_meta(out: Path, rejected, warnings, seconds: float) -> ExtractResult:
    meta = artifacts.read_json(out / "meta.json")
    counts = {s: meta["subsets"].count(s) for s in ("train", "val", "test")}
    return ExtractResult(out, meta["n_images"], meta["dim"], meta["classes"], counts, rejected, 0, meta["n_images"],
                         seconds, None, up_to_date=True, warnings=warnings)


def _keep_rows(the_split: Split, kept: np.ndarray) -> Split:
    if len(kept) == len(the_split.paths):
        return the_split
    return Split([the_split.paths[i] for i in kept], [the_split.labels[i] for i in kept],
                 [the_split.subsets[i] for i in kept], the_split.n_duplicate_groups, the_split.warnings)


def _meta(usable: Dataset, final: Split, spec: ExtractorSpec, runtime: str, run_key: str, dim: int, split_args: dict,
          elapsed: float, rate: float | None) -> dict[str, Any]:
    return {
        "format": FEATURES_FORMAT,
        "data": str(usable.root),
        "classes": usable.classes,
        "n_images": len(final.paths),
        "dim": dim,
        "paths": final.paths,
        "subsets": final.subsets,
        "extractor": spec.pinned().to_dict(),
        "runtime": runtime,
        "split": {**split_args, "fingerprint": final.fingerprint, "duplicate_groups": final.n_duplicate_groups,
                  "counts": final.counts()},
        "run_key": run_key,
        "versions": artifacts.package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(rate, 2) if rate else None,
    }


def _publish_outputs(out: Path, final: Split, meta: dict, rejected, file_ids: list[str], spec_key: str) -> None:
    """Replace the outputs; `meta.json` goes last, so a reader that finds it finds a complete set."""
    (out / "meta.json").unlink(missing_ok=True)
    (out / CACHE_DIR / "rows.json").unlink(missing_ok=True)  # rows.json must never describe other features
    os.replace(out / "features.npy.new", out / "features.npy")
    classes = meta["classes"]
    artifacts.write_npy_atomic(out / "labels.npy", np.array([classes.index(c) for c in final.labels], dtype=np.int64))
    final.write_csv(out / "split.csv")
    artifacts.write_csv_atomic(out / "rejected.csv", ("path", "reason"), rejected)
    artifacts.write_json_atomic(out / CACHE_DIR / "rows.json", {"spec_key": spec_key, "file_ids": file_ids})
    artifacts.write_json_atomic(out / "meta.json", meta)
