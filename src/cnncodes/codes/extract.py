"""`extract`: a folder of images in, one CNN code per image out.

`extract()` reads as three public steps, so engines differ only in where the work runs:

    the_plan = plan(dataset, out, ...)              # check every file, hash, split: before any network
    done = compute_codes(out, job, ids, engine)     # the engine's batches of codes -> a FeatureWriter
    publish(out, the_plan, done, ...)               # atomic outputs, meta.json last

An engine composes the same pieces: `decode` (a file to pixels, or the reason it cannot
be used), a runner (pixels to codes, `CodeJob.runner`), and the driver's `FeatureWriter`
(rows of a .npy written in place, in any order). `LocalEngine` runs them on threads of this
machine; `cnncodes.codes.ray_engine.RayEngine` on the actors of a Ray cluster.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from functools import cached_property, partial
from operator import index
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, cast, get_args

import numpy as np

from cnncodes.codes.store import CheckCache, FeatureWriter, matching_rows, npy_layout, salvage
from cnncodes.core import files as artifacts
from cnncodes.core.choices import EngineName
from cnncodes.core.errors import CnnCodesError, check_types
from cnncodes.core.progress import progress_bar, warn
from cnncodes.data.ingest import BadImage, Check, Dataset, check_image, check_resize, discover, is_uri, load_square
from cnncodes.data.remote import UriRoot, discover_uri, file_ids, local_file
from cnncodes.data.split import (
    DEFAULT_DUP_THRESHOLD,
    DEFAULT_FRACTIONS,
    Split,
    assign_subsets,
    check_dup_threshold,
    duplicate_warnings,
    group_duplicates,
    label_indices,
    parse_fractions,
)
from cnncodes.nets.backbones import DEFAULT_BACKBONE, POOLINGS, get_backbone
from cnncodes.nets.weights import Weights
from cnncodes.runtime import quantize
from cnncodes.runtime.runners import MeanOfViews, MirrorAveraged, Runner, cache_record, check_runtime, make_runner

# Format 2 keeps the rows' paths and subsets in split.csv only; format 1 listed them in meta.json too.
FEATURES_FORMAT = "cnncodes.features/2"
# The files of a features folder: written by `publish` here, read by `features.load_features`.
META_FILE, CODES_FILE, LABELS_FILE = "meta.json", "features.npy", "labels.npy"
GROUPS_FILE, SPLIT_FILE, REJECTED_FILE = "groups.npy", "split.csv", "rejected.csv"
# Bump when the way an extractor is built changes, so no cache keeps codes of the old build.
EXTRACTOR_FORMAT = 1
CACHE_DIR = ".cache"
# In CACHE_DIR: the digest (`id_digests`) of each row's file id in features.npy, so the next run reuses its rows,
# and the index saying which extractor made them and what they took (present only while both describe features.npy).
_ROW_IDS, _ROWS = "rows-ids.npy", "rows.json"
# rejected.csv: why each file was skipped, and the category (`BadImage.category`) summaries count.
REJECTED_COLUMNS = ("path", "reason", "category")
ENGINES: tuple[str, ...] = get_args(EngineName)
# Files checked between two saves of the check cache.
CHECK_CHUNK = 4096


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
    # Several input sizes whose codes are averaged (the image is decoded at `image_size`, the largest); None: one.
    scales: list[int] | None = None
    # The codes stored per image, one per scale (their mean is the image's code); None: the mean alone.
    views: int | None = None
    # fp32, or int8: a quantized copy of the ONNX model, calibrated on train images only.
    precision: str = "fp32"
    # int8 only: {"n"} as asked, then the images chosen ("images", "holdout") and their "fingerprint".
    calibration: dict[str, Any] | None = None
    # Recorded by the cache when the model was made: the configuration int8 chose and its agreement with fp32.
    quantization: dict[str, Any] | None = None
    # The model's outputs on the probe batch (runtime.fingerprint): pins the cached model to these codes.
    probe: list[float] | None = None
    # How an extractor is built from these fields; specs of another format are refused, not rebuilt differently.
    format: int = EXTRACTOR_FORMAT

    @classmethod
    def create(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        layer: str | None = None,
        pooling: str = "avg",
        image_size: int | str | Sequence[int] | None = None,
        resize: str = "crop",
        weights: str = "imagenet",
        flip: bool = False,
        precision: str = "fp32",
        calibration: int = quantize.DEFAULT_CALIBRATION,
        runtime: str = "onnx",
    ) -> tuple[ExtractorSpec, Weights]:
        """Validate the user's choices and resolve the weights file (no TensorFlow needed)."""
        check_types(flip=(flip, bool), calibration=(calibration, int))
        quantize.check_precision(precision, runtime, calibration)
        entry = get_backbone(backbone)
        layer = layer or entry.default_layer
        if pooling not in POOLINGS:
            raise CnnCodesError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        check_resize(resize)
        sizes = input_sizes(image_size, entry.default_sizes(pooling, layer))
        entry.check_sizes(sizes, layer)
        averaged = [what for what, on in (("--flip", flip), ("several --image-size", len(sizes) > 1)) if on]
        if averaged and pooling == "flatten" and not entry.needs_top(layer):
            raise CnnCodesError(
                f"averaging an image's codes ({' and '.join(averaged)}) only makes sense for pooled codes: "
                "use --pooling avg or max"
            )
        resolved = entry.resolve_weights(weights, layer)
        spec = cls(
            backbone=entry.name,
            layer=layer,
            pooling="none" if entry.needs_top(layer) else pooling,
            image_size=sizes[-1],
            resize=resize,
            preprocessing=entry.preprocessing,
            weights=resolved.kind,
            weights_sha256=resolved.sha256,
            weights_file=str(resolved.path) if resolved.path else None,
            flip=flip,
            scales=sizes if len(sizes) > 1 else None,
            views=len(sizes) if len(sizes) > 1 else None,
            precision=precision,
            calibration={"n": calibration} if precision == "int8" else None,
        )
        return spec, resolved

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractorSpec:
        """The spec recorded in meta.json or a bundle; one made by another version of cnncodes is refused in one line.

        Specs saved before the format was recorded are format 1.
        """
        made = data.get("format", 1)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if made != EXTRACTOR_FORMAT or unknown:
            what = f"extractor format {made}" + (f" with fields {', '.join(unknown)}" if unknown else "")
            raise CnnCodesError(
                f"these codes or this model were made by another version of cnncodes ({what}; this one "
                f"builds format {EXTRACTOR_FORMAT}): extract and fit again with this version, or "
                f"install "
                "the one that made them"
            )
        try:
            return cls(**{**data, "format": made})
        except TypeError as e:  # a field it needs is missing
            raise CnnCodesError(f"the recorded extractor is incomplete ({e}): extract and fit again") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def network_key(self) -> str:
        """Equal keys mean equal networks. Untrained weights depend on Keras's initialisers."""
        ignored = ("weights_file", "flip", "precision", "calibration", "quantization", "probe")
        identity = {k: v for k, v in self.to_dict().items() if k not in ignored} | {"format": EXTRACTOR_FORMAT}
        if self.scales is None:  # one size: the key it had before scales existed
            del identity["scales"]
        if self.views is None:  # the mean alone: the key it had before views were stored
            del identity["views"]
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

    def calibrated(self, train: Sequence[Path | str]) -> ExtractorSpec:
        """For int8, the calibration and held-out images, chosen among `train` (never val or test images)."""
        if self.precision == "fp32":
            return self
        n = (self.calibration or {}).get("n", quantize.DEFAULT_CALIBRATION)
        return replace(self, calibration=quantize.calibration_set(train, n))

    def pinned(self) -> ExtractorSpec:
        """This spec with what the cache recorded when it made the model: the probe fingerprint, int8's choice."""
        record = cache_record(self.model_key) or {}
        return replace(
            self, probe=record.get("probe", self.probe), quantization=record.get("quantization", self.quantization)
        )

    def find_weights(self, override: str | None = None) -> Weights:
        """The weights these codes were made with, found again (or at `override`) and checked by SHA-256."""
        if self.weights == "none":
            return Weights("none")
        if not override and self.weights == "file" and not Path(self.weights_file or "").is_file():
            raise CnnCodesError(
                f"this model was made with the weights file {self.weights_file}, which is not there any more: "
                f"give its new place with --weights PATH (its SHA-256: {self.weights_sha256})"
            )
        choice = override or ("imagenet" if self.weights == "imagenet" else self.weights_file) or ""
        found = get_backbone(self.backbone).resolve_weights(choice, self.layer)
        if found.sha256 != self.weights_sha256:
            raise CnnCodesError(
                f"the weights {found.path or choice} are not the ones this model was made with ({self.weights_file}, "
                f"SHA-256 {self.weights_sha256}): give the right file with --weights PATH"
            )
        return found

    def build(self, weights: Weights):
        """The Keras extractor: uint8 pixels in, codes out."""
        from cnncodes.nets.models import build_extractor

        entry = get_backbone(self.backbone)
        return build_extractor(
            entry, self.image_size, self.layer, self.pooling, weights, self.scales or (), bool(self.views)
        )

    def runner(
        self, weights: Weights, runtime: str = "onnx", threads: int | None = None, per_view: bool = False
    ) -> Runner:
        """The extractor on `runtime`, at its precision; with a cached ONNX model, TensorFlow is never loaded.

        On a cache miss the network is converted in a child process (and quantized for int8), so
        calling this ahead of time, e.g. in a container build, prepares the cache. `threads`
        caps ONNX Runtime's operator threads (a server process, a Ray actor). Its codes are the
        images' codes, or with `per_view` every view's code side by side, as `extract` stores them.
        """
        quantize.check_precision(self.precision, runtime)
        build = partial(self.build, weights)  # picklable: the conversion runs in a child process
        if self.precision == "int8":
            found: Runner = quantize.int8_runner(self, build, notice=warn, threads=threads)
        else:
            found = make_runner(
                build, self.network_key, runtime, notice=warn, pin=self.probe, label=self.backbone, threads=threads
            )
        found = MirrorAveraged(found) if self.flip else found
        return MeanOfViews(found, self.views) if self.views and not per_view else found

    def prepare(self, weights: Weights | None = None) -> None:
        """Convert (and for int8 quantize) this extractor into the cache ahead of time, e.g. in a container build."""
        self.runner(weights or self.find_weights())


def input_sizes(image_size: int | str | Sequence[int] | None, default: list[int]) -> list[int]:
    """The square sizes an image is seen at, smallest first: `image_size` (one, several, "224,288"), else `default`."""
    if image_size is None:
        return default
    try:
        parts = image_size.split(",") if isinstance(image_size, str) else image_size
        sizes = sorted({int(p) if isinstance(p, str) else index(p) for p in np.atleast_1d(parts).tolist()})
    except (TypeError, ValueError):
        sizes = []
    if not sizes or sizes[0] < 1:
        raise CnnCodesError(f"--image-size takes sizes in pixels, e.g. 224 or 224,288,384 (got {image_size!r})")
    return sizes


def decode(path: Path | str, size: int, resize: str = "crop") -> np.ndarray | BadImage:
    """The pixels a network sees for one file (a path or a URI), or why it cannot be used: never raises."""
    try:
        with local_file(path) as local:
            return load_square(local, size, resize)
    except BadImage as e:
        return e


def check_file(path: Path | str) -> Check:
    """`check_image` of a path or a URI: usable or not, and the perceptual hash."""
    try:
        with local_file(path) as local:
            return check_image(local)
    except BadImage as e:
        return Check(str(e), None, e.category)


def discover_data(data: Path | str) -> Dataset:
    """`discover` for a folder or a CSV, local or in an object store (a URI, or a CSV whose paths are URIs)."""
    if is_uri(str(data)):
        return discover_uri(str(data))
    dataset = discover(data)
    uris = sum(map(is_uri, dataset.paths))
    if uris and uris < len(dataset):
        raise CnnCodesError(f"{data} lists URIs and local paths together: list one kind of path per CSV")
    if uris:
        return Dataset(UriRoot(""), dataset.paths, dataset.labels, dataset.skipped)  # type: ignore[arg-type]
    return dataset


@dataclass
class Batch:
    """Decoded images of one batch; files that failed to decode are in `failed`."""

    rows: np.ndarray
    pixels: np.ndarray
    failed: list[tuple[int, BadImage]] = field(default_factory=list)

    @classmethod
    def of(cls, rows: Sequence[int], decoded: Sequence[np.ndarray | BadImage], size: int) -> Batch:
        """Sort what `decode` returned into pixels and the reasons of the files that failed."""
        good = [(row, d) for row, d in zip(rows, decoded) if isinstance(d, np.ndarray)]
        failed = [(int(row), d) for row, d in zip(rows, decoded) if isinstance(d, BadImage)]
        pixels = np.stack([d for _, d in good]) if good else np.empty((0, size, size, 3), np.uint8)
        return cls(np.array([row for row, _ in good], dtype=np.int64), pixels, failed)


class ImageReader:
    """Decodes files into batches of `size`×`size` pixels on worker threads, a few batches ahead.

    Pillow releases the GIL while it decodes and resizes, so threads overlap with each
    other and with the forward pass that consumes the batches.
    """

    AHEAD = 2  # batches decoded ahead of the one being consumed

    def __init__(
        self,
        paths: Sequence[Path | str],
        size: int,
        resize: str = "crop",
        batch_size: int = 32,
        workers: int | None = None,
    ):
        self.paths = paths
        self.size = size
        self.resize = resize
        self.batch_size = batch_size
        self.workers = workers or os.cpu_count() or 2

    def __call__(self, rows: Sequence[int] | np.ndarray) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=self.workers)
        pending: deque = deque()
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                pending.append((chunk, [pool.submit(decode, self.paths[r], self.size, self.resize) for r in chunk]))
                if len(pending) > self.AHEAD:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, chunk: Sequence[int], futures: list) -> Batch:
        return Batch.of(chunk, [f.result() for f in futures], self.size)


class Files(Sequence[str]):
    """The files of a dataset by row, joined to its root on demand: a million rows hold no million paths."""

    def __init__(self, root: Path | str, names: Sequence[str]):
        self.root, self.names = root, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return Files(self.root, self.names[index])
        return str(self.root / self.names[index])


# A file's size, modification time, inode and change time, as os.stat gives them.
_STAT = np.dtype([("size", "<i8"), ("mtime", "<i8"), ("inode", "<u8"), ("ctime", "<i8")])


class FileIds(Sequence[str]):
    """Each file's identity (`_file_ids`), formatted when read.

    Its path is the dataset's own string and its numbers sit in one array, so a million
    files hold no million id strings for the whole run.
    """

    def __init__(self, names: Sequence[str], stats: np.ndarray):
        self.names, self.stats = names, stats  # stats: _STAT rows; a size of -1 is a missing file

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size, mtime, inode, ctime = self.stats[index].tolist()
        name = self.names[index]
        return f"{name}|missing" if size < 0 else f"{name}|{size}|{mtime}|{inode}|{ctime}"


def _take(ids: Sequence[str], rows: np.ndarray, names: Sequence[str]) -> Sequence[str]:
    """The ids of `rows` (ascending), whose paths are `names`: lazy `FileIds` if they were; `ids` if all."""
    if len(rows) == len(ids):
        return ids
    return FileIds(names, ids.stats[rows]) if isinstance(ids, FileIds) else [ids[i] for i in rows.tolist()]


class CodeBatch(NamedTuple):
    """Codes of some rows, as an engine returns them (in any order), and the rows that failed."""

    rows: np.ndarray
    codes: np.ndarray
    failed: list[tuple[int, BadImage]]


@dataclass
class CodeJob:
    """What to compute: the extractor, the files by row, and how many images per forward pass."""

    spec: ExtractorSpec
    weights: Weights
    runtime: str
    paths: Sequence[Path | str]
    batch_size: int = 32

    @cached_property
    def runner(self) -> Runner:
        """Built on first use only: a run that reuses every row never loads a network."""
        return self.spec.runner(self.weights, self.runtime, per_view=True)


class Engine(Protocol):
    """Where checking and the forward passes run; the driver keeps the caches and writes every output."""

    name: ClassVar[str]

    def describe(self) -> dict[str, Any]:
        """The engine and the size of its cluster, for meta.json."""
        ...

    def check(
        self, files: Sequence[Path | str], advance: Callable[[int], None]
    ) -> Iterator[tuple[list[int], list[Check]]]:
        """`check_file` of every file, as (positions in `files`, checks) in any order."""
        ...

    def codes(self, job: CodeJob, rows: np.ndarray) -> Iterator[CodeBatch]:
        """Codes of `rows` of `job.paths`, as they come."""
        ...


@dataclass
class LocalEngine:
    """Threads of this machine decode; ONNX Runtime (or Keras) uses all its cores for the forward pass."""

    workers: int | None = None
    name: ClassVar[str] = "local"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": 1, "cpus": os.cpu_count()}

    def check(
        self, files: Sequence[Path | str], advance: Callable[[int], None]
    ) -> Iterator[tuple[list[int], list[Check]]]:
        with ThreadPoolExecutor(self.workers or os.cpu_count() or 2) as pool:  # Pillow decodes without the GIL
            for start in range(0, len(files), CHECK_CHUNK):
                chunk = files[start : start + CHECK_CHUNK]
                found = []
                for check in pool.map(check_file, chunk):
                    found.append(check)
                    advance(1)
                yield list(range(start, start + len(chunk))), found

    def codes(self, job: CodeJob, rows: np.ndarray) -> Iterator[CodeBatch]:
        reader = ImageReader(job.paths, job.spec.image_size, job.spec.resize, job.batch_size, self.workers)
        for batch in reader(rows):
            yield CodeBatch(batch.rows, job.runner(batch.pixels), batch.failed)


def make_engine(name: str = "local", workers: int | None = None, address: str | None = None) -> Engine:
    """The engine called `name`; Ray is an optional extra, imported only when asked for."""
    if name == "local":
        if address:
            raise CnnCodesError("--address names a Ray cluster: use it with --engine ray")
        return LocalEngine(workers)
    if name != "ray":
        raise CnnCodesError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    try:
        from cnncodes.codes.ray_engine import RayEngine
    except ImportError as e:
        raise CnnCodesError(f"--engine ray needs Ray ({e}): install it with pip install 'cnncodes[ray]'") from None
    return RayEngine(workers, address)


@dataclass
class ExtractResult:
    """What `extract` produced, for the CLI's summary and for notebooks."""

    out: Path
    n_images: int
    dim: int
    classes: list[str]
    counts: dict[str, int]
    rejected: list[tuple[str, str, str]]  # REJECTED_COLUMNS
    computed: int
    reused: int
    seconds: float
    images_per_second: float | None
    up_to_date: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_meta(cls, out: Path, meta: dict[str, Any], rejected, warnings, **run: Any) -> ExtractResult:
        """The result of a run whose `meta.json` holds `meta`; `run` says what this run itself did."""
        counts = meta["split"]["counts"]
        return cls(out, meta["n_images"], meta["dim"], meta["classes"], counts, rejected, warnings=warnings, **run)


def extract(
    data: Path | str,
    out: Path | str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    layer: str | None = None,
    pooling: str = "avg",
    weights: str = "imagenet",
    image_size: int | str | Sequence[int] | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    split: str | Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    workers: int | None = None,
    runtime: str = "onnx",
    flip: bool = False,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    calibration: int = quantize.DEFAULT_CALIBRATION,
) -> ExtractResult:
    """Write CNN codes of every usable image in `data` to `out` (see the README for the files).

    Bad files are skipped and listed in `rejected.csv`; re-running with the same data and
    settings recomputes nothing, and an interrupted run resumes where it stopped.

    Args:
        data: a class-per-folder directory or a `path,label` CSV, local or `s3://…`.
        out: the features folder (created if missing).
        backbone: a registry name (`cnncodes backbones` lists them).
        layer: the layer whose output is the code (default: the registry's deepest tap).
        pooling: `avg`, `max` or `flatten`.
        weights: `imagenet`, `none` (untrained, seeded) or the path of a Keras weights file.
        image_size: square input size, or several whose codes are averaged (default: the backbone's).
        resize: `crop`, `squash` or `pad`.
        batch_size: images per forward pass.
        split: train,val,test fractions.
        seed: the split's hash seed.
        dup_threshold: pHash bits within which two images are duplicates (0-16; -1 turns it off).
        workers: decoding threads locally, actors on Ray.
        runtime: `onnx` (default) or `keras`.
        flip: average each code with that of the mirror image (twice the forward passes).
        progress: rich progress bars.
        engine: `local` or `ray`.
        address: a Ray cluster (else `RAY_ADDRESS`, else a new local one).
        on_batch: `on_batch(done, total)` after each batch of codes is safely stored, to follow a
            run from a notebook or stop it (raise KeyboardInterrupt) as Ctrl-C would.
        precision: `fp32`, or `int8`: a quantized model calibrated on `calibration` train images.
        calibration: how many train images calibrate the int8 model.
    """
    started = time.perf_counter()
    check_types(batch_size=(batch_size, int), seed=(seed, int), dup_threshold=(dup_threshold, int))
    if batch_size < 1:
        raise CnnCodesError(f"--batch-size must be at least 1 (got {batch_size})")
    check_runtime(runtime)
    if engine == "ray" and runtime == "keras":
        raise CnnCodesError("--engine ray runs the network on ONNX Runtime on its workers: drop --runtime keras")
    check_dup_threshold(dup_threshold)
    fractions = parse_fractions(split)
    check_out(data, Path(out))
    dataset = discover_data(data)  # a missing or empty DATA fails before anything is written or downloaded
    discovered = time.perf_counter() - started
    spec, resolved = ExtractorSpec.create(
        backbone, layer, pooling, image_size, resize, weights, flip, precision, calibration, runtime
    )
    out = Path(out)
    engine_started = time.perf_counter()
    where = make_engine(engine, workers, address)
    engine_start = time.perf_counter() - engine_started
    with artifacts.exclusive(
        out / CACHE_DIR / "extract.lock",
        f"another cnncodes extract is writing to {out}: wait for it to finish, or give this one another --out",
    ):
        the_plan = plan(dataset, out, fractions, seed, dup_threshold, workers, progress, where)
        spec = spec.calibrated(the_plan.train_files())  # names, not a Path per train image, none kept
        settings = {"fractions": fractions, "seed": seed, "dup_threshold": dup_threshold}  # they decide groups.npy
        subsets = the_plan.split
        run_key = artifacts.sha256_json([spec.key, the_plan.file_ids, subsets.labels, subsets.subsets, settings])
        if (published := _up_to_date(out, run_key, len(the_plan.usable))) is not None:
            meta = _moved(out, published, str(the_plan.usable.root), spec.weights_file)
            return _unchanged(out, meta, the_plan.rejected, subsets.warnings, time.perf_counter() - started)
        job = CodeJob(spec, resolved, runtime, Files(the_plan.usable.root, the_plan.usable.paths), batch_size)
        done = compute_codes(out, job, the_plan.file_ids, where, progress, on_batch)
        stages = {
            "discover": round(discovered, 3),
            "engine": round(engine_start, 3),
            **the_plan.seconds,
            "codes": round(done.seconds, 3),
        }
        meta = publish(out, the_plan, done, spec, runtime, where.describe(), run_key, settings, started, stages)
    return ExtractResult.from_meta(
        out,
        meta,
        the_plan.rejected + done.failed_paths(the_plan),
        the_plan.split.warnings,
        computed=done.computed,
        reused=done.reused,
        seconds=meta["elapsed_seconds"],
        images_per_second=meta["images_per_second"],
    )


def skipped_summary(rejected: Sequence[tuple[str, str, str]], listing: Path) -> str:
    """The one line that says how many files were skipped, by category, and where they are listed."""
    reasons = Counter(category for _, _, category in rejected)
    by_category = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
    return f"skipped {len(rejected)} file(s) ({by_category}): see {listing}"


def check_out(data: Path | str, out: Path) -> None:
    """A features folder must be a folder, and not inside a class-per-folder DATA, where it would be read as images."""
    if out.exists() and not out.is_dir():
        raise CnnCodesError(f"--out {out} is a file: give a folder for the features")
    if not is_uri(str(data)) and Path(data).is_dir() and out.resolve().is_relative_to(Path(data).resolve()):
        raise CnnCodesError(
            f"--out {out} is inside DATA {data}: the next run would read its files as images; write the features "
            "outside the image folder"
        )


class Plan(NamedTuple):
    """The usable images of a dataset and their split, decided before any network runs."""

    usable: Dataset
    split: Split
    rejected: list[tuple[str, str, str]]  # REJECTED_COLUMNS
    file_ids: Sequence[str]
    groups: np.ndarray  # duplicate group of each usable image: equal ids are near-duplicates
    seconds: dict[str, float]  # per stage: check, duplicates, split

    def train_files(self) -> Files:
        """The train images, int8's calibration candidates: names joined to the root only when read."""
        names = [p for p, s in zip(self.split.paths, self.split.subsets) if s == "train"]
        return Files(self.usable.root, names)


def plan(
    dataset: Dataset,
    out: Path,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    workers: int | None = None,
    progress: bool = True,
    engine: Engine | None = None,
) -> Plan:
    """Check every image `discover` found, write `out/rejected.csv`, and split the usable ones.

    Stops with a `CnnCodesError` when a class, or the whole dataset, has no usable image.
    """
    clock = _Stopwatch()
    all_ids = _file_ids(dataset)
    reasons, categories, all_hashes = _check(
        dataset, all_ids, out / CACHE_DIR, engine or LocalEngine(workers), progress
    )
    rejected = dataset.skipped + [
        (p, r, c or "") for p, r, c in zip(dataset.paths, reasons, categories) if r is not None
    ]
    artifacts.write_csv_atomic(out / REJECTED_FILE, REJECTED_COLUMNS, rejected)
    keep = np.flatnonzero([r is None for r in reasons])
    usable = _require_usable(dataset, keep)
    phashes = cast(list[str], [all_hashes[i] for i in keep.tolist()])  # usable files have one
    clock.lap("check")
    groups = group_duplicates(phashes, dup_threshold)
    warnings = duplicate_warnings(groups, usable.paths, usable.labels, dup_threshold)
    clock.lap("duplicates")
    the_split = assign_subsets(usable.paths, usable.labels, groups, fractions, seed)
    the_split.warnings += warnings
    clock.lap("split")
    return Plan(usable, the_split, rejected, _take(all_ids, keep, usable.paths), groups, clock.laps)


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


def _file_ids(dataset: Dataset) -> Sequence[str]:
    """A file's identity for caches: its path, size, modification time, inode and change time.

    The inode and change time catch a file replaced or edited in place with its size and
    modification time kept (`touch -r`, `rsync -a`, `exiftool -P`).
    """
    if isinstance(dataset.root, UriRoot):
        return file_ids(dataset)
    stats = np.empty(len(dataset.paths), dtype=_STAT)
    for i, rel in enumerate(dataset.paths):
        try:
            st = (dataset.root / rel).stat()
            stats[i] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        except OSError:
            stats[i] = (-1, 0, 0, 0)
    return FileIds(dataset.paths, stats)


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


class Computed(NamedTuple):
    """The filled FeatureWriter of a run, and how its rows came to be."""

    writer: FeatureWriter
    computed: int
    reused: int
    failed: list[tuple[int, BadImage]]
    seconds: float  # this run's forward passes
    earlier_seconds: float  # the share of earlier runs' time in the rows reused or resumed
    ids: np.ndarray  # the digest of each row's file id (`id_digests`)

    def failed_paths(self, the_plan: Plan) -> list[tuple[str, str, str]]:
        return [(the_plan.usable.paths[row], str(bad), bad.category) for row, bad in self.failed]


def compute_codes(
    out: Path,
    job: CodeJob,
    file_ids: Sequence[str],
    engine: Engine,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> Computed:
    """Fill a FeatureWriter: resume, reuse rows of an earlier run, then let `engine` compute the rest."""
    ids = id_digests(file_ids)  # one pass over the ids: the writer's key and every match use their digests
    writer = _seeded_writer(out, job, ids)
    reused = int(writer.done.sum())
    failed: list[tuple[int, BadImage]] = []
    todo = writer.todo
    started = time.perf_counter()
    if len(todo):
        total = len(file_ids)
        with progress_bar(
            f"Extracting {job.spec.backbone}/{job.spec.layer}", total, enabled=progress, completed=total - len(todo)
        ) as advance:
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
    previous = _previous_rows(out, job.spec.key, ids)
    covered = previous is not None and len(previous.pairs) == len(ids)
    dim = previous.dim if previous is not None and covered else job.runner.dim
    key = artifacts.sha256_json([job.spec.key, hashlib.sha256(ids.tobytes()).hexdigest()])
    salvaged = salvage(out / CACHE_DIR, key, ids, job.spec.key)
    writer = FeatureWriter(out / CACHE_DIR, key, len(ids), dim, ids, job.spec.key)
    if previous is not None:
        writer.copy_from(previous.path, previous.pairs, previous.seconds * len(previous.pairs) / max(previous.rows, 1))
    if salvaged is not None:
        writer.copy_from(salvaged.path, salvaged.pairs, salvaged.seconds)
        salvaged.discard()
    return writer


def id_digests(file_ids: Sequence[str]) -> np.ndarray:
    """A 16-byte digest of each file's identity: a million of them are 16 MB, sortable and comparable at once."""
    return np.array(
        [hashlib.blake2b(fid.encode("utf-8", "surrogateescape"), digest_size=16).digest() for fid in file_ids],
        dtype="S16",
    )


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
    _finish_publishing(out)
    try:
        index = artifacts.read_object(cache / _ROWS)
        if index["spec_key"] != spec_key:
            return None
        (rows, dim), _ = npy_layout(out / CODES_FILE)
        seconds = float(index.get("seconds", 0.0))
        # folders published before rows-ids.npy listed the ids themselves
        old = id_digests(index["file_ids"]) if "file_ids" in index else np.load(cache / _ROW_IDS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pairs = matching_rows(old[:rows], ids)
    return _Previous(out / CODES_FILE, rows, dim, pairs, seconds) if len(pairs) else None


def _identity(path: Path) -> list[int]:
    """What tells a file from its replacement (a rename keeps all of it): inode, size, modification time.

    Not the device number, which a network or overlay file system may change when it is mounted again.
    """
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _finish_publishing(out: Path) -> None:
    """Finish the renames of a publish killed after it replaced `features.npy` (the new `rows.json` names it)."""
    cache = out / CACHE_DIR
    try:
        pending = artifacts.read_object(cache / f"{_ROWS}.new")
        done = pending["features"] == _identity(out / CODES_FILE)
    except (OSError, ValueError, KeyError):
        return
    if done:
        if (cache / f"{_ROW_IDS}.new").is_file():
            os.replace(cache / f"{_ROW_IDS}.new", cache / _ROW_IDS)
        os.replace(cache / f"{_ROWS}.new", cache / _ROWS)


def _up_to_date(out: Path, run_key: str, n_usable: int) -> dict[str, Any] | None:
    """meta.json if published for this key with a code for every usable image (one that failed is tried again)."""
    try:
        meta = artifacts.read_object(out / META_FILE)
    except (OSError, ValueError):
        return None
    complete = meta.get("n_images") == n_usable and (out / CODES_FILE).is_file() and (out / LABELS_FILE).is_file()
    return meta if meta.get("run_key") == run_key and complete else None


def _moved(out: Path, meta: dict[str, Any], data: str, weights_file: str | None) -> dict[str, Any]:
    """Keep `meta.json` saying where the images and weights file are when they moved and the codes did not change.

    The codes' identity leaves both out (a moved folder keeps its files), but the models fitted on
    them record both: `predict` finds the weights there, the HTML report the images. Returns
    meta.json (`meta`, as read) as it now is.
    """
    if meta["data"] != data or meta["extractor"].get("weights_file") != weights_file:
        meta["data"], meta["extractor"]["weights_file"] = data, weights_file
        artifacts.write_json_atomic(out / META_FILE, meta)
    return meta


def _unchanged(out: Path, meta: dict[str, Any], rejected, warnings, seconds: float) -> ExtractResult:
    """The result of a run that found its codes up to date (`meta`, its meta.json): every row reused, none computed."""
    return ExtractResult.from_meta(
        out,
        meta,
        rejected,
        warnings,
        computed=0,
        reused=meta["n_images"],
        seconds=seconds,
        images_per_second=None,
        up_to_date=True,
    )


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


def publish(
    out: Path,
    the_plan: Plan,
    done: Computed,
    spec: ExtractorSpec,
    runtime: str,
    engine: dict[str, Any],
    run_key: str,
    split_args: dict[str, Any],
    started: float,
    stages: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Replace the outputs; returns the meta record.

    The order keeps every kill recoverable: the new `rows-ids.npy` and `rows.json` are
    written beside the old ones (naming the file of finished rows), `meta.json` and `rows.json`
    go, the finished rows become `features.npy`, the new row files take the old ones' names
    (three renames, finished by the next run if cut short), and only then is the unfinished
    state forgotten; `meta.json` goes last, so a reader that finds it finds a complete set.
    A run killed in between reuses every row.
    """
    published = time.perf_counter()
    finished, kept = done.writer.finished_file()
    elapsed = done.earlier_seconds + published - started
    final = _keep_rows(the_plan.split, kept)
    cache = out / CACHE_DIR
    artifacts.write_npy_atomic(cache / f"{_ROW_IDS}.new", done.ids[kept])
    artifacts.write_json_atomic(
        cache / f"{_ROWS}.new", {"spec_key": spec.key, "seconds": elapsed, "features": _identity(finished)}
    )
    (out / META_FILE).unlink(missing_ok=True)
    (cache / _ROWS).unlink(missing_ok=True)  # rows.json must never describe other features
    os.replace(finished, out / CODES_FILE)
    os.replace(cache / f"{_ROW_IDS}.new", cache / _ROW_IDS)
    os.replace(cache / f"{_ROWS}.new", cache / _ROWS)
    done.writer.discard()
    classes = the_plan.usable.classes
    artifacts.write_npy_atomic(out / LABELS_FILE, label_indices(final.labels, classes))
    artifacts.write_npy_atomic(
        out / GROUPS_FILE, np.unique(the_plan.groups[kept], return_inverse=True)[1].astype(np.int64)
    )
    final.write_csv(out / SPLIT_FILE)
    artifacts.write_csv_atomic(out / REJECTED_FILE, REJECTED_COLUMNS, the_plan.rejected + done.failed_paths(the_plan))
    rate = done.computed / done.seconds if done.computed and done.seconds else None
    meta = _meta(
        the_plan.usable,
        final,
        spec,
        runtime,
        engine,
        run_key,
        done.writer.dim // (spec.views or 1),
        split_args,
        done.earlier_seconds + time.perf_counter() - started,
        rate,
    )
    meta["stage_seconds"] = {**(stages or {}), "publish": round(time.perf_counter() - published, 3)}
    artifacts.write_json_atomic(out / META_FILE, meta)
    return meta


def _meta(
    usable: Dataset,
    final: Split,
    spec: ExtractorSpec,
    runtime: str,
    engine: dict[str, Any],
    run_key: str,
    dim: int,
    split_args: dict,
    elapsed: float,
    rate: float | None,
) -> dict[str, Any]:
    return {
        "format": FEATURES_FORMAT,
        "data": str(usable.root),
        "classes": usable.classes,
        "n_images": len(final.paths),
        "dim": dim,
        "extractor": spec.pinned().to_dict(),
        "runtime": runtime,
        "engine": engine,
        "split": {
            **split_args,
            "fingerprint": final.fingerprint,
            "duplicate_groups": final.n_duplicate_groups,
            "counts": final.counts(),
        },
        "run_key": run_key,
        "versions": artifacts.package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(rate, 2) if rate else None,
    }
