"""Runners: uint8 pixel batches in, model outputs out, on ONNX Runtime or Keras.

Keras defines the models and loads the weights; the frozen forward pass runs fastest on
ONNX Runtime (several times TensorFlow's speed on a CPU, and no TensorFlow import). A
Keras model is converted once with `model.export(format="onnx")` in a child process that
exits afterwards (TensorFlow and the converter hold gigabytes the extracting process never
needs), checked against Keras on a probe batch, and cached under a key that names
everything that decides its output, so with a warm cache `extract` and `predict` never load
TensorFlow. If conversion fails or disagrees, the Keras runner takes over with a one-line
notice: never a wrong answer.

A cache entry is pinned to something outside the cache: the fingerprint of Keras's outputs
on the probe batch travels in `meta.json` and in every bundle (`ExtractorSpec.probe`), and a
cached model whose outputs do not match it is refused, so an entry swapped together with its
record cannot silently give another network's codes.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
from filelock import FileLock

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import (
    package_versions,
    read_json,
    sha256_file,
    sha256_json,
    write_bytes_atomic,
    write_json_atomic,
)
from cnncodes.core.progress import say
from cnncodes.runtime.child import ChildDied, in_child

Runtime = Literal["onnx", "keras"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
CACHE_ENV = "CNNCODES_CACHE_DIR"
# ONNX and Keras outputs must agree to this fraction of the largest output on the probe batch.
TOLERANCE = 1e-4
# A model's probe fingerprint must match the pinned one to this fraction of its largest value:
# loose enough for int8 rebuilt by another ONNX Runtime, far tighter than any other network.
PIN_TOLERANCE = 1e-2
_CONVERTERS = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime")
# What the first-use notice promises: 7-20 s measured by scripts/bench_convert.py on 2 cores
# (docs/benchmarks.md, "Conversion").
CONVERSION_ESTIMATE = "~10-30 s"
# Failures that may not happen again (memory, disk space): never recorded as permanent.
_TRANSIENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG)


class Runner(Protocol):
    dim: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


class KerasRunner:
    """Runs a Keras model's compiled forward pass on batches of uint8 pixels."""

    def __init__(self, model):
        self.model = model
        self.dim = int(np.prod(model.output_shape[1:]))
        self.input_shape = tuple(model.input_shape[1:])
        self.output_shape = tuple(model.output_shape[1:])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.empty((0, self.dim), np.float32)
        return np.asarray(self.model.predict_on_batch(pixels), dtype=np.float32).reshape(len(pixels), -1)


class OnnxRunner:
    """Runs an ONNX model with ONNX Runtime, all cores for the operators.

    Its threads sleep rather than spin between operators: the decoding threads of the
    input pipeline share the same few cores (measured: +8-15% for MobileNetV2 `extract`
    on 2 cores, no change for ResNet50).
    """

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1  # a Ray actor: its own CPUs only
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.input_shape = tuple(self.session.get_inputs()[0].shape[1:])
        self.output_shape = tuple(self.session.get_outputs()[0].shape[1:])
        self.dim = int(np.prod(self.output_shape))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.empty((0, self.dim), np.float32)
        out = self.session.run(None, {self.input: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(pixels), -1)


class MirrorAveraged:
    """A runner whose codes are the mean of the image's and its mirror image's codes.

    The cheapest test-time augmentation: a flower or a dog is the same class seen from
    either side, and averaging the two views steadies the code (measured on Flowers-17
    in docs/benchmarks.md, "Accuracy"). Twice the forward passes; the same runner serves both views.
    """

    def __init__(self, runner: Runner):
        self.runner = runner
        self.dim = runner.dim
        self.input_shape, self.output_shape = runner.input_shape, runner.output_shape

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return (self.runner(pixels) + self.runner(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2


class MeanOfViews:
    """A runner whose code is the mean of the `views` codes an extractor gives side by side (one per scale).

    `extract` stores every view, for training; an image to classify needs only their mean.
    """

    def __init__(self, runner: Runner, views: int):
        self.runner, self.views = runner, views
        self.dim = runner.dim // views
        self.input_shape = runner.input_shape
        self.output_shape: tuple[int, ...] = (self.dim,)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.runner(pixels).reshape(len(pixels), self.views, self.dim).mean(axis=1)


def probe_batch(input_shape: Sequence[int]) -> np.ndarray:
    """The fixed batch every model is checked on: two images of seeded noise."""
    return np.random.default_rng(0).integers(0, 256, size=(2, *input_shape), dtype=np.uint8)


def fingerprint(outputs: np.ndarray) -> list[float]:
    """Eight numbers that tell one network's probe outputs from another's: their projections on fixed directions.

    Small enough for every meta.json and bundle, whatever the code's dimension.
    """
    flat = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    directions = np.random.default_rng(1).standard_normal((flat.shape[1], 4))
    return [float(f"{v:.7g}") for v in (flat @ directions / np.sqrt(flat.shape[1])).ravel()]


def probe_fingerprint(runner: Runner) -> list[float]:
    return fingerprint(runner(probe_batch(runner.input_shape)))


def matches(found: Sequence[float], pinned: Sequence[float]) -> bool:
    a, b = np.asarray(found, dtype=np.float64), np.asarray(pinned, dtype=np.float64)
    return a.shape == b.shape and float(np.abs(a - b).max()) <= PIN_TOLERANCE * max(float(np.abs(b).max()), 1e-6)


def cache_dir() -> Path:
    """`$CNNCODES_CACHE_DIR`, else `$XDG_CACHE_HOME/cnncodes`, else `~/.cache/cnncodes`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "cnncodes"


def onnx_cache_path(model_key: str) -> Path:
    """Where the ONNX twin of the model with `model_key` lives, for the installed converters.

    Without Keras (a serving image without TensorFlow) nothing converts here: the model is the one
    `cnncodes prepare` cached for this key where TensorFlow is installed, whichever converters made it.
    """
    versions = {name: v for name, v in package_versions().items() if name in _CONVERTERS}
    path = cache_dir() / "onnx" / f"{sha256_json([model_key, versions])[:32]}.onnx"
    if "keras" in versions or path.with_suffix(".json").is_file():
        return path
    return next(
        (p.with_suffix(".onnx") for p in sorted(path.parent.glob("*.json")) if _recorded_key(p) == model_key), path
    )


def _recorded_key(record: Path) -> Any:
    try:
        return read_json(record).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def check_can_convert(label: str) -> None:
    """Stop, in one line, where a model missing from the cache cannot be converted: TensorFlow is not installed.

    Raises:
        CnnCodesError: Keras is not installed.
    """
    if "keras" not in package_versions():
        raise CnnCodesError(
            f"{label} is not prepared for ONNX Runtime in {cache_dir() / 'onnx'} and TensorFlow is not installed "
            f"here to convert it: run `cnncodes prepare` on the model where TensorFlow is installed, with "
            f"${CACHE_ENV} set to this cache"
        )


def cache_record(model_key: str) -> dict[str, Any] | None:
    """What the cache recorded when it made the model with `model_key` (None if it holds none)."""
    try:
        record = read_json(onnx_cache_path(model_key).with_suffix(".json"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == model_key else None


def private_cache_dir(model_key: str) -> Path:
    """The folder of `model_key`'s cache entry, created readable by this user only.

    Anyone who can write there decides which network runs, so the folders are 0700.
    """
    folder = onnx_cache_path(model_key).parent
    for d in (folder.parent, folder):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise CnnCodesError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")


def make_runner(
    build: Callable[[], Any],
    model_key: str,
    runtime: str = "onnx",
    notice: Callable[[str], None] | None = None,
    pin: Sequence[float] | None = None,
    label: str = "this model",
    threads: int | None = None,
) -> Runner:
    """A runner for the model that `build()` makes; on ONNX, built and converted only on a cache miss.

    `pin` is the probe fingerprint recorded with earlier codes of this model: a cached model
    that does not match it is converted again, and a conversion that does not match it is
    refused. A picklable `build` (a function or a bound method with picklable arguments) is
    converted in a child process; `prepare` ahead of time is the same call. `threads` caps
    ONNX Runtime's operator threads (default: every core).
    """
    check_runtime(runtime)
    if runtime == "keras":
        return KerasRunner(build())
    found = onnx_model(build, model_key, notice, pin, label, threads)
    if isinstance(found, OnnxRunner):
        return found
    _say(notice, f"{label} cannot run on ONNX Runtime ({found}); running on Keras instead")
    return KerasRunner(build())


def onnx_model(
    build: Callable[[], Any],
    model_key: str,
    notice: Callable[[str], None] | None = None,
    pin: Sequence[float] | None = None,
    label: str = "this model",
    threads: int | None = None,
) -> OnnxRunner | str:
    """The checked ONNX model of `build()`, converted on a cache miss; a string says why there is none."""
    path = onnx_cache_path(model_key)
    found = cached_runner(path, model_key, pin, threads)
    if isinstance(found, OnnxRunner):
        return found
    if found is not None:
        _say(notice, f"the cached ONNX model {path} was refused ({found}): converting {label} again")
    with _one_converter(path, model_key):  # another process converting this model: wait, take what it made
        made = cached_runner(path, model_key, pin, threads)
        if isinstance(made, OnnxRunner):
            return made
        return _converted(build, path, model_key, notice, pin, label, threads)


@contextmanager
def _one_converter(path: Path, model_key: str) -> Iterator[None]:
    """One process at a time converts the model cached at `path` (xdist workers, Ray actors, two commands)."""
    try:
        private_cache_dir(model_key)  # made private before the lock file is made in it
        lock = FileLock(path.with_suffix(".lock"))
        lock.acquire()
    except OSError:  # a cache that cannot be written: converting fails later, with the reason
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _converted(
    build: Callable[[], Any],
    path: Path,
    model_key: str,
    notice: Callable[[str], None] | None,
    pin: Sequence[float] | None,
    label: str,
    threads: int | None,
) -> OnnxRunner | str:
    """Convert `build()` into the cache at `path`, or say why it cannot be (recorded, unless it may pass later)."""
    failed = path.with_suffix(".failed")
    if failed.is_file():  # converting again would fail again
        return f"{failed.read_text().strip()}; to try converting again, delete {failed}"
    check_can_convert(label)
    if notice:  # news, not a warning: said once per model, since the cached model serves every later run
        say(f"Converting {label} for ONNX Runtime (first use; cached for later runs): {CONVERSION_ESTIMATE}")
    try:
        runner = _convert(build, path, model_key, threads)
    except CnnCodesError:  # the model cannot be built at all (a bad layer, weights that do not fit): no fallback
        raise
    except Exception as e:
        cache = cache_dir()
        if isinstance(e, OSError) and Path(str(e.filename or "")).is_relative_to(cache):  # nothing can be recorded
            return f"the ONNX cache {cache} cannot be written ({e.strerror}): set {CACHE_ENV} to a writable folder"
        reason = first_line(e)
        if not _transient(e):
            write_bytes_atomic(failed, reason.encode())
        return reason
    refuse_unpinned(runner, pin, label)
    return runner


def refuse_unpinned(runner: Runner, pin: Sequence[float] | None, label: str) -> None:
    """Stop when a freshly made model does not give the outputs recorded with earlier codes."""
    if pin is not None and not matches(probe_fingerprint(runner), pin):
        raise CnnCodesError(
            f"{label} made here does not give the outputs recorded with these codes (other weights, "
            "another Keras or a changed network): make the codes again with this installation"
        )


def cached_runner(
    path: Path, model_key: str, pin: Sequence[float] | None = None, threads: int | None = None
) -> OnnxRunner | str | None:
    """The cached model, checked against its record, its key and the pin; None if absent or damaged.

    A string says why an intact entry was refused: made for another key, or outputs that
    are not the pinned ones (an entry swapped together with its record).
    """
    try:
        record = read_json(path.with_suffix(".json"))
        if sha256_file(path) != record["sha256"]:
            return None
        if record.get("key") != model_key:
            return "it was made for another model"
        runner = OnnxRunner(path, threads)
    except Exception:
        return None
    if pin is not None and not matches(probe_fingerprint(runner), pin):
        return "its outputs on the probe batch are not the ones recorded with these codes"
    return runner


def cache_model(made: Path, path: Path, record: dict[str, Any]) -> None:
    """Move a checked model into the cache and write its record beside it (the record last)."""
    os.replace(made, path)
    write_json_atomic(path.with_suffix(".json"), {"sha256": sha256_file(path), **record})


def _convert(build: Callable[[], Any], path: Path, model_key: str, threads: int | None = None) -> OnnxRunner:
    """Export in a child process, check the result against Keras here, then publish it atomically."""
    scratch = Path(tempfile.mkdtemp(dir=private_cache_dir(model_key), prefix=".export-"))
    try:
        exported = scratch / "model.onnx"
        expected, name = in_child(_export, build, exported)
        runner = OnnxRunner(exported, threads)
        worst = float(np.abs(runner(probe_batch(runner.input_shape)) - expected).max())
        if worst > TOLERANCE * max(float(np.abs(expected).max()), 1e-6):
            raise RuntimeError(f"ONNX output differs from Keras by {worst:.3g}")
        cache_model(exported, path, {"key": model_key, "model": name, "probe": fingerprint(expected)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runner


def _export(build: Callable[[], Any], exported: Path) -> tuple[np.ndarray, str]:
    """Build the Keras model and export it; its outputs on the probe batch are what the ONNX model must give."""
    model = build()
    expected = KerasRunner(model)(probe_batch(model.input_shape[1:]))  # also tells the exporter the model's inputs
    converter_log = logging.getLogger("tf2onnx")
    level = converter_log.level
    converter_log.setLevel(logging.CRITICAL)  # its fix-up chatter is not the user's business
    try:
        with warnings.catch_warnings():  # the converter's NumPy-2 shims warn about np.object
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(exported), format="onnx", verbose=False)
    finally:
        converter_log.setLevel(level)
    return expected, model.name


def _transient(error: BaseException) -> bool:
    """Out of memory (also a child killed by the kernel) or out of disk: worth trying again next time."""
    if isinstance(error, MemoryError) or (isinstance(error, ChildDied) and error.killed):
        return True
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def _say(notice: Callable[[str], None] | None, message: str) -> None:
    if notice:
        notice(message)
