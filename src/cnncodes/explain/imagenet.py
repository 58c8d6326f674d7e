"""`imagenet`: what the network itself sees in an image, as its own ImageNet top-5.

Before trusting a backbone's codes for a new domain, it helps to see what the network makes
of the images as trained: the whole network, its classifier top included, run like every
extractor (ONNX Runtime, converted once and cached), on images decoded as `predict` decodes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.codes.reading import ImageReader
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.progress import progress_bar, warn
from cnncodes.nets.backbones import Backbone, get_backbone
from cnncodes.nets.imagenet import (
    ImagenetClass,
    build_imagenet_model,
    find_imagenet_files,
    read_class_index,
)
from cnncodes.nets.weights import Weights
from cnncodes.runtime.runners import Runner, check_runtime, make_runner
from cnncodes.serving.predict import expand_inputs

# Images are seen as ImageNet's evaluation saw them: the centre square.
RESIZE = "crop"


@dataclass
class ImagenetAnswer:
    """The network's most probable ImageNet classes for one image, most probable first; `error` says why none.

    Each of `top_k` has the class's `wnid` (WordNet id), `name` and `probability`.
    """

    filename: str
    top_k: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def imagenet_runner(entry: Backbone, weights: Weights, *, runtime: str = "onnx") -> Runner:
    """The whole network on `runtime`: uint8 pixels in, ImageNet class probabilities out.

    Cached under a key naming the backbone, the weights' SHA-256 and the input size, so a second
    run neither converts nor loads TensorFlow.

    Args:
        entry: the backbone's registry entry.
        weights: the resolved weights of the network with its top.
        runtime: `onnx` or `keras`.

    Returns:
        The runner.
    """
    key = f"imagenet:{entry.name}:{weights.sha256}:{entry.default_size}"
    build = partial(build_imagenet_model, entry.name, weights)  # picklable: the conversion runs in a child process
    return make_runner(build, key, runtime, notice=warn, label=f"{entry.name} with its ImageNet top")


def imagenet_top(
    images: str | Path | Sequence[str | Path],
    *,
    backbone: str,
    top_k: int = 5,
    weights: str = "imagenet",
    class_index: Path | str | None = None,
    batch_size: int = 32,
    runtime: str = "onnx",
    progress: bool = True,
) -> list[ImagenetAnswer]:
    """The ImageNet classes the network itself gives each image; unreadable ones get an `error` instead.

    Args:
        images: image files, folders (searched recursively) or glob patterns, as `predict` takes them.
        backbone: a registry name.
        top_k: how many classes each answer lists.
        weights: `imagenet` or the path of a weights file of the whole network with its classifier top.
        class_index: a class index like Keras's `imagenet_class_index.json`; None finds Keras's own.
        batch_size: images per forward pass.
        runtime: `onnx` (default) or `keras`.
        progress: a rich progress bar.

    Returns:
        One answer per input, in order.

    Raises:
        CnnCodesError: bad arguments, missing files, or a class index that does not fit the network.
    """
    if top_k < 1 or batch_size < 1:
        raise CnnCodesError(f"--top-k and --batch-size must be at least 1 (got {top_k} and {batch_size})")
    check_runtime(runtime)
    inputs = expand_inputs([images] if isinstance(images, (str, os.PathLike)) else images)
    if not inputs:
        raise CnnCodesError("no images given")
    entry = get_backbone(backbone)
    found, index_path = find_imagenet_files(entry, weights=weights, class_index=class_index)
    classes = read_class_index(index_path)
    runner = imagenet_runner(entry, found, runtime=runtime)
    if runner.dim != len(classes):
        raise CnnCodesError(
            f"{index_path} names {len(classes)} classes, but {entry.name} with these weights gives {runner.dim}: "
            "give the class index of these weights with --class-index"
        )
    answers = [ImagenetAnswer(path, error=error) for path, error in inputs]
    rows = [i for i, (_, error) in enumerate(inputs) if error is None]
    reader = ImageReader([Path(p) for p, _ in inputs], entry.default_size, RESIZE, batch_size)
    with progress_bar("Classifying", len(rows), enabled=progress and bool(rows)) as advance:
        for batch in reader(rows):
            for row, proba in zip(batch.rows, runner(batch.pixels)):
                answers[row].top_k = ranked(proba, classes, top_k=top_k)
            for row, bad in batch.failed:
                answers[row].error = str(bad)
            advance(len(batch.rows) + len(batch.failed))
    return answers


def ranked(proba: np.ndarray, classes: Sequence[ImagenetClass], *, top_k: int) -> list[dict[str, Any]]:
    """The `top_k` most probable classes of one row of probabilities, most probable first.

    Args:
        proba: one image's class probabilities.
        classes: the class of each output.
        top_k: how many to list.

    Returns:
        Each class's `wnid`, `name` and `probability`.
    """
    order = np.argsort(-proba, kind="stable")[:top_k]
    return [{"wnid": classes[i].wnid, "name": classes[i].name, "probability": float(proba[i])} for i in order]
