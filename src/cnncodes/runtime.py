"""Runners: uint8 pixel batches in, model outputs out, on ONNX Runtime or Keras.

Keras defines the models and loads the weights; the frozen forward pass runs fastest on
ONNX Runtime (several times TensorFlow's speed on a CPU, and no TensorFlow import). A
Keras model is converted once with `model.export(format="onnx")`, checked against Keras
on a probe batch, and cached under a key that names everything that decides its output,
so with a warm cache `extract` and `predict` never load TensorFlow. If conversion fails
or disagrees, the Keras runner takes over with a one-line notice: never a wrong answer.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifacts import package_versions, read_json, sha256_file, sha256_json, write_bytes_atomic, write_json_atomic
from .errors import CnnCodesError

RUNTIMES = ("onnx", "keras")
CACHE_ENV = "CNNCODES_CACHE_DIR"
# ONNX and Keras outputs must agree to this fraction of the largest output on the probe batch.
TOLERANCE = 1e-4
_CONVERTERS = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime")


class Runner(Protocol):
    dim: int

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


class KerasRunner:
    """Runs a Keras model's compiled forward pass on batches of uint8 pixels."""

    def __init__(self, model):
        self.model = model
        self.dim = int(np.prod(model.output_shape[1:]))

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
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.dim = int(np.prod(self.session.get_outputs()[0].shape[1:]))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.empty((0, self.dim), np.float32)
        out = self.session.run(None, {self.input: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(pixels), -1)


class MirrorAveraged:
    """A runner whose codes are the mean of the image's and its mirror image's codes.

    The cheapest test-time augmentation: a flower or a dog is the same class seen from
    either side, and averaging the two views steadies the code (measured on Flowers-17
    in the README). Twice the forward passes; the same runner serves both views.
    """

    def __init__(self, runner: Runner):
        self.runner = runner
        self.dim = runner.dim

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return (self.runner(pixels) + self.runner(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2


def cache_dir() -> Path:
    """`$CNNCODES_CACHE_DIR`, else `$XDG_CACHE_HOME/cnncodes`, else `~/.cache/cnncodes`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "cnncodes"


def onnx_cache_path(model_key: str) -> Path:
    """Where the ONNX twin of the model with `model_key` lives, for the installed converters."""
    versions = {name: v for name, v in package_versions().items() if name in _CONVERTERS}
    return cache_dir() / "onnx" / f"{sha256_json([model_key, versions])[:32]}.onnx"


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise CnnCodesError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")


def make_runner(build: Callable[[], Any], model_key: str, runtime: str = "onnx",
                notice: Callable[[str], None] | None = None, threads: int | None = None) -> Runner:
    """A runner for the model that `build()` makes; on ONNX, built and converted only on a cache miss.

    `threads` caps ONNX Runtime's operator threads (default: every core).
    """
    check_runtime(runtime)
    if runtime == "keras":
        return KerasRunner(build())
    path = onnx_cache_path(model_key)
    cached = _load_cached(path, threads)
    if cached is not None:
        return cached
    failed = path.with_suffix(".failed")
    model = build()
    if failed.is_file():  # converting again would fail again: go straight to Keras
        reason = failed.read_text().strip()
    else:
        try:
            return _convert(model, path, threads)
        except Exception as e:  # noqa: BLE001 - any converter failure falls back to the exact Keras path
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            write_bytes_atomic(failed, reason.encode())
    if notice:
        notice(f"this model cannot run on ONNX Runtime ({reason}); running on Keras instead")
    return KerasRunner(model)


def _load_cached(path: Path, threads: int | None = None) -> OnnxRunner | None:
    """The cached ONNX model, unless it is missing, damaged or not the file its record names."""
    try:
        record = read_json(path.with_suffix(".json"))
        if sha256_file(path) != record["sha256"]:
            return None
        return OnnxRunner(path, threads)
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, whatever is wrong with it
        return None


def _convert(model, path: Path, threads: int | None = None) -> OnnxRunner:
    """Export to ONNX, check it against Keras on a probe batch, then publish it atomically."""
    probe = np.random.default_rng(0).integers(0, 256, size=(2, *model.input_shape[1:]), dtype=np.uint8)
    expected = KerasRunner(model)(probe)  # also the call Keras's exporter needs to know the model's inputs
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=".export-"))
    try:
        exported = scratch / "model.onnx"
        converter_log = logging.getLogger("tf2onnx")
        level = converter_log.level
        converter_log.setLevel(logging.CRITICAL)  # its fix-up chatter is not the user's business
        try:
            with warnings.catch_warnings():  # the converter's NumPy-2 shims warn about np.object
                warnings.simplefilter("ignore", FutureWarning)
                model.export(str(exported), format="onnx", verbose=False)
        finally:
            converter_log.setLevel(level)
        runner = OnnxRunner(exported, threads)
        worst = float(np.abs(runner(probe) - expected).max())
        if worst > TOLERANCE * max(float(np.abs(expected).max()), 1e-6):
            raise CnnCodesError(f"ONNX output differs from Keras by {worst:.3g}")
        os.replace(exported, path)
        write_json_atomic(path.with_suffix(".json"), {"sha256": sha256_file(path), "model": model.name})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runner
