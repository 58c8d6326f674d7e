"""`predict`: new images through a saved model, with exactly the preprocessing it was trained with.

The bundle carries the extractor spec, so the network, layer, pooling, input size, resize
mode and weights (checked by SHA-256) are rebuilt from it: the user passes only images.
"""

from __future__ import annotations

import glob
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import package_versions
from .bundle import load_bundle, load_record_for
from .classifiers import class_probabilities
from .errors import CnnCodesError
from .extract import ExtractorSpec, ImageReader
from .ingest import image_files
from .progress import progress_bar, warn
from .runtime import make_runner


@dataclass
class Prediction:
    """The answer for one input image; `error` says why a file could not be read."""

    path: str
    label: str | None = None
    probability: float | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expand_inputs(items: Sequence[str | Path]) -> list[tuple[str, str | None]]:
    """Files, folders (searched recursively for images) and glob patterns, as (path, error)."""
    found: list[tuple[str, str | None]] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            found += [(str(p), None) for p in image_files(path)]
        elif path.is_file():
            found.append((item, None))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            found += [(p, None) for p in matches] or [(item, "no file matches this pattern")]
        else:
            found.append((item, "file not found"))
    return found


def load_predictor(model: Path | str, weights: str | None = None, runtime: str = "onnx"):
    """A function from uint8 pixel batches to class probabilities, its input size, resize mode and classes."""
    if Path(model).suffix == ".keras":
        return _finetuned_predictor(Path(model), runtime)
    bundle = load_bundle(Path(model))
    spec = ExtractorSpec.from_dict(bundle["extractor"])
    if spec.weights == "none":
        made, installed = bundle["versions"].get("keras"), package_versions().get("keras")
        if made != installed:
            raise CnnCodesError(f"{model} uses untrained weights drawn by Keras {made}; Keras {installed} would draw "
                                f"others: install keras=={made}")
    runner = spec.runner(spec.find_weights(weights), runtime)
    classifier, classes = bundle["model"], bundle["classes"]

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        return class_probabilities(classifier, runner(pixels), len(classes))

    return probabilities, spec.image_size, spec.resize, classes


def _finetuned_predictor(path: Path, runtime: str):
    """A fine-tuned `.keras` model (pixels in, probabilities out), checked against its run record."""
    record, data = load_record_for(path)
    build = partial(_load_verified, path.name, data)  # picklable: the conversion runs in a child process
    runner = make_runner(build, f"finetuned:{record['model_sha256']}", runtime, notice=warn, label=path.name)
    spec = record["extractor"]
    return runner, spec["image_size"], spec["resize"], record["classes"]


def _load_verified(name: str, data: bytes):
    """The fine-tuned Keras model from exactly the bytes that were verified against its record."""
    import keras

    from . import preprocessing  # noqa: F401 - registers the Preprocess layer the model contains

    with tempfile.TemporaryDirectory() as tmp:
        verified = Path(tmp) / name
        verified.write_bytes(data)
        return keras.saving.load_model(verified)


def predict(model: Path | str, images: Sequence[str | Path], *, top_k: int = 3, batch_size: int = 32,
            weights: str | None = None, runtime: str = "onnx", progress: bool = True) -> list[Prediction]:
    """Predict every image; unreadable ones get an `error` instead of a label."""
    if top_k < 1:
        raise CnnCodesError(f"--top-k must be at least 1 (got {top_k})")
    inputs = expand_inputs(images)
    if not inputs:
        raise CnnCodesError("no images given")
    probabilities, image_size, resize, classes = load_predictor(model, weights, runtime)
    results = [Prediction(path, error=error) for path, error in inputs]
    rows = [i for i, (_, error) in enumerate(inputs) if error is None]
    reader = ImageReader([Path(p) for p, _ in inputs], image_size, resize, batch_size)
    with progress_bar("Predicting", len(rows), enabled=progress) as advance:
        for batch in reader(rows):
            for row, proba in zip(batch.rows, probabilities(batch.pixels)):
                _fill(results[row], proba, classes, top_k)
            for row, reason in batch.failed:
                results[row].error = reason
            advance(len(batch.rows) + len(batch.failed))
    return results


def _fill(result: Prediction, proba: np.ndarray, classes: Sequence[str], top_k: int) -> None:
    order = np.argsort(-proba, kind="stable")[:top_k]
    result.top_k = [{"label": classes[i], "probability": round(float(proba[i]), 6)} for i in order]
    result.label, result.probability = result.top_k[0]["label"], result.top_k[0]["probability"]
