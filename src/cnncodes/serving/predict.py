"""`predict`: new images through a saved model, with exactly the preprocessing it was trained with.

The bundle carries the extractor spec, so the network, layer, pooling, input size, resize
mode and weights (checked by SHA-256) are rebuilt from it: the user passes only images.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.classify.calibration import class_probabilities
from cnncodes.codes.reading import ImageReader
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import package_versions
from cnncodes.core.progress import progress_bar, warn
from cnncodes.data.decode import MAX_PIXELS, load_square
from cnncodes.data.ingest import image_files
from cnncodes.runs.bundle import load_bundle, load_record_for
from cnncodes.runs.records import MODEL_SUFFIXES
from cnncodes.runtime.runners import check_runtime, make_runner


@dataclass
class Prediction:
    """The answer for one input image; `error` says why it could not be read."""

    filename: str
    label: str | None = None
    probability: float | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Predictor:
    """A loaded model: images in, `Prediction`s out, decoded exactly as its training images were.

    `predict` and `cnncodes serve` both go through it: `pixels` is the one decoding path
    (files or uploaded bytes, through `ingest.load_square`), `answers` the one way a batch
    of pixels becomes predictions.
    """

    probabilities: Callable[[np.ndarray], np.ndarray]
    image_size: int
    resize: str
    classes: list[str]
    record: dict[str, Any]

    def pixels(self, source: Path | str | bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """The `image_size`² pixels the model sees for a file or its bytes; raises `BadImage`.

        `max_pixels`: a service's cap on the pixels decoded (see `ingest.load_rgb`).
        """
        return load_square(source, self.image_size, self.resize, max_pixels)

    def answers(self, filenames: Sequence[str], pixels: np.ndarray, top_k: int) -> list[Prediction]:
        if not len(pixels):  # a batch whose every file was unreadable
            return []
        return [self.answer(name, proba, top_k) for name, proba in zip(filenames, self.probabilities(pixels))]

    def answer(self, filename: str, proba: np.ndarray, top_k: int) -> Prediction:
        """The prediction for one row of class probabilities: the `top_k` classes, most likely first."""
        order = np.argsort(-proba, kind="stable")[:top_k]
        top = [{"label": self.classes[i], "probability": round(float(proba[i]), 6)} for i in order]
        return Prediction(filename, top[0]["label"], top[0]["probability"], top)


def expand_inputs(items: Sequence[str | Path]) -> list[tuple[str, str | None]]:
    """Files, folders (searched recursively for images) and glob patterns, as (path, error)."""
    found: list[tuple[str, str | None]] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            found += [(str(p), None) for p in image_files(path)] or [(item, "a folder with no image files in it")]
        elif path.is_file():
            found.append((item, None))
        elif path.exists():  # a FIFO, a socket, a device: reading it could block or never end
            found.append((item, "not a regular file"))
        elif glob.has_magic(item):
            found += [(p, None) for p in _matches(item)] or [(item, "no file matches this pattern")]
        else:
            found.append((item, "file not found"))
    return found


def checked_inputs(
    images: str | Path | Sequence[str | Path], *, top_k: int, batch_size: int, runtime: str
) -> list[tuple[str, str | None]]:
    """The settings every command that runs a saved model on images checks, and its inputs expanded.

    Args:
        images: image files, folders or glob patterns; or one of them.
        top_k: how many classes to give per image.
        batch_size: images per forward pass.
        runtime: `onnx` or `keras`.

    Returns:
        The inputs as (path, error), as `expand_inputs` gives them.

    Raises:
        CnnCodesError: a setting out of range, or no images at all.
    """
    if top_k < 1:
        raise CnnCodesError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise CnnCodesError(f"--batch-size must be at least 1 (got {batch_size})")
    check_runtime(runtime)
    inputs = expand_inputs([images] if isinstance(images, (str, os.PathLike)) else images)
    if not inputs:
        raise CnnCodesError("no images given")
    return inputs


def _matches(pattern: str) -> list[str]:
    """The files a glob pattern matches. `**` goes through pathlib, which does not descend into linked folders:
    glob's `**` follows them, and a link to a parent folder makes the search grow without end."""
    if "**" not in pattern:
        return sorted(p for p in glob.glob(pattern) if Path(p).is_file())
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path()
    return sorted(str(p) for p in root.glob(str(Path(*parts[fixed:]))) if p.is_file())


def load_predictor(
    model: Path | str, weights: str | None = None, runtime: str = "onnx", threads: int | None = None
) -> Predictor:
    """Verify and load a `.joblib` bundle or a fine-tuned `.keras` model; `threads` caps ONNX Runtime's threads.

    `weights` is where the model's weights file is now, if it moved; a model whose network is in
    the ONNX cache (`cnncodes prepare`) needs none.
    """
    kind = Path(model).suffix.lower()
    if kind == ".json":  # the run record, given for the model it describes
        beside = [Path(model).with_suffix(s) for s in MODEL_SUFFIXES if Path(model).with_suffix(s).is_file()]
        if beside:
            raise CnnCodesError(f"{model} is a run record: give the model beside it, {beside[0]}")
    if kind not in MODEL_SUFFIXES:
        what = "a folder" if Path(model).is_dir() else "not a model file"
        raise CnnCodesError(f"{model} is {what}: give a .joblib bundle from fit-svm or a .keras model from finetune")
    if kind == ".keras":
        return _finetuned_predictor(Path(model), runtime, threads)
    record, bundle = load_bundle(Path(model))
    spec = ExtractorSpec.from_dict(bundle["extractor"])
    check_loadable(model, spec, bundle["versions"])
    # A prepared model's network is its cached ONNX model: the weights are looked for only to build one. A file
    # the user names is checked all the same, so a wrong one is refused rather than ignored.
    runner = spec.runner(spec.find_weights(weights) if weights else spec.find_weights, runtime, threads)
    classifier, classes = bundle["model"], bundle["classes"]

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        return class_probabilities(classifier, runner(pixels), len(classes))

    return Predictor(probabilities, spec.image_size, spec.resize, classes, record)


def check_loadable(model: Path | str, spec: ExtractorSpec, versions: dict[str, Any]) -> None:
    """Refuse a bundle whose untrained network this Keras would draw differently.

    Args:
        model: the bundle, for the message.
        spec: its extractor.
        versions: the package versions its record holds.

    Raises:
        CnnCodesError: untrained weights drawn by another Keras.
    """
    if spec.weights != "none":
        return
    made, installed = versions.get("keras"), package_versions().get("keras")
    if made != installed:
        raise CnnCodesError(
            f"{model} uses untrained weights drawn by Keras {made}; Keras {installed} would draw "
            f"others: install keras=={made}"
        )


def load_finetuned(path: Path) -> tuple[dict[str, Any], Any]:
    """A fine-tuned `.keras` model loaded in Keras, from exactly the bytes its run record vouches for.

    Args:
        path: the `.keras` file, its record beside it.

    Returns:
        The run record and the Keras model.
    """
    record, data = load_record_for(path)
    return record, _load_verified(path.name, data)


def _finetuned_predictor(path: Path, runtime: str, threads: int | None) -> Predictor:
    """A fine-tuned `.keras` model (pixels in, probabilities out), checked against its run record."""
    record, data = load_record_for(path)
    build = partial(_load_verified, path.name, data)  # picklable: the conversion runs in a child process
    runner = make_runner(
        build, f"finetuned:{record['model_sha256']}", runtime, notice=warn, label=path.name, threads=threads
    )
    spec = record["extractor"]
    size, classes = spec["image_size"], record["classes"]
    if tuple(runner.input_shape[:2]) != (size, size) or runner.dim != len(classes):  # the record was edited
        raise CnnCodesError(
            f"{path} takes {runner.input_shape[0]}-px images and gives {runner.dim} classes, but its run record says "
            f"{size} px and {len(classes)} classes: the record was changed; fit the model again"
        )
    return Predictor(runner, size, spec["resize"], classes, record)


def _load_verified(name: str, data: bytes):
    """The fine-tuned Keras model from exactly the bytes that were verified against its record."""
    import keras

    from cnncodes.nets import preprocessing  # noqa: F401 - registers the Preprocess layer the model contains

    with tempfile.TemporaryDirectory() as tmp:
        verified = Path(tmp) / name
        verified.write_bytes(data)
        return keras.saving.load_model(verified)


def predict(
    model: Path | str,
    images: str | Path | Sequence[str | Path],
    *,
    top_k: int = 3,
    batch_size: int = 32,
    weights: str | None = None,
    runtime: str = "onnx",
    progress: bool = True,
) -> list[Prediction]:
    """Predict every image with a saved model; unreadable ones get an `error` instead of a label.

    The model's run record says how it was made, so the same extractor (network, layer,
    pooling, size, resize mode, weights checked by SHA-256, precision) is rebuilt from it.

    Args:
        model: a `.joblib` bundle from `fit_svm` or a `.keras` model from `finetune`, with
            its `.json` run record beside it (the file is verified against it before loading).
        images: image files, folders (searched recursively) or glob patterns; or one of them.
        top_k: how many classes each `Prediction.top_k` lists.
        batch_size: images per forward pass.
        weights: where the model's weights file is now, if it moved since extraction.
        runtime: `onnx` (default, no TensorFlow with a warm cache) or `keras`.
        progress: a rich progress bar.

    Returns:
        One `Prediction` per input, in order (`filename`, `label`, `probability`, `top_k`, `error`).
    """
    inputs = checked_inputs(images, top_k=top_k, batch_size=batch_size, runtime=runtime)
    predictor = load_predictor(model, weights, runtime)
    results = [Prediction(path, error=error) for path, error in inputs]
    rows = [i for i, (_, error) in enumerate(inputs) if error is None]
    reader = ImageReader([Path(p) for p, _ in inputs], predictor.image_size, predictor.resize, batch_size)
    with progress_bar("Predicting", len(rows), enabled=progress and bool(rows)) as advance:
        for batch in reader(rows):
            names = [results[row].filename for row in batch.rows]
            for row, answer in zip(batch.rows, predictor.answers(names, batch.pixels, top_k)):
                results[row] = answer
            for row, bad in batch.failed:
                results[row].error = str(bad)
            advance(len(batch.rows) + len(batch.failed))
    return results
