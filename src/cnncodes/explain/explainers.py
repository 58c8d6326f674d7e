"""Explainers: a saved model, able to give the probabilities of a batch and the maps behind them.

A fit-svm bundle explains through its network's unpooled maps (exact CAM for linear models on
average-pooled codes, occlusion in feature space otherwise); a fine-tuned `.keras` model
through Grad-CAM. `explain` only sees this small interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cnncodes.classify.calibration import class_probabilities
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.progress import warn
from cnncodes.explain.maps import FeatureMaps
from cnncodes.explain.place import combined
from cnncodes.explain.readout import CAM, LINEAR_KINDS, evidence, pooled
from cnncodes.nets.backbones import REGISTRY, get_backbone
from cnncodes.runs.bundle import load_bundle
from cnncodes.serving.predict import check_loadable, load_finetuned

# What each method's maps are in, for explain.json.
UNITS = {
    CAM: "decision score per cell (the map's mean plus the intercept is the class's score)",
    "occlusion": "drop of the class's probability when the cell is left out of the code",
    "grad-cam": "logit evidence (ReLU of gradient-weighted activations)",
}


@dataclass(frozen=True)
class Explanation:
    """One batch: its class probabilities and, per explained class, a map on one grid per image.

    Attributes:
        probabilities: (images, classes).
        explained: (images, k): the explained classes' indices.
        maps: (images, rows, columns, k): the maps of the k explained classes.
        intercepts: (images, k): CAM's intercepts (zeros for the other methods).
        method: `cam`, `occlusion` or `grad-cam`.
    """

    probabilities: np.ndarray
    explained: np.ndarray
    maps: np.ndarray
    intercepts: np.ndarray
    method: str


class Explainer(Protocol):
    """What `explain` needs of a model."""

    classes: list[str]
    image_size: int
    resize: str
    record: dict[str, Any]
    zero_pixel: tuple[int, int, int]  # the pixel the network's input layer maps to 0: deletion's "removed"

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(images, classes) probabilities of uint8 pixels."""

    def explain(self, pixels: np.ndarray, choose: Any) -> Explanation:
        """Probabilities and the maps of the classes `choose(probabilities)` gives, (images, k) indices."""


class BundleExplainer:
    """A fit-svm bundle: its classifier reads the pooled maps of its own network.

    Args:
        path: the `.joblib` bundle, its run record beside it.
        weights: where its weights file is now, if it moved.
        runtime: `onnx` or `keras`.
        threads: caps ONNX Runtime's operator threads (a server's share of the cores).
    """

    def __init__(self, path: Path, weights: str | None = None, runtime: str = "onnx", threads: int | None = None):
        self.record, bundle = load_bundle(path)
        self.spec = ExtractorSpec.from_dict(bundle["extractor"])
        check_loadable(path, self.spec, bundle["versions"])
        self.model, self.classes = bundle["model"], list(bundle["classes"])
        found = self.spec.find_weights(weights) if weights else self.spec.find_weights
        self.maps = FeatureMaps(self.spec, found, runtime, threads)
        self.image_size, self.resize = self.spec.image_size, self.spec.resize
        if self.model.kind in LINEAR_KINDS and self.spec.pooling != "avg":
            warn(
                f"codes pooled by {self.spec.pooling} have no exact class activation map: the maps show occlusion "
                "(how much the class's probability drops without each cell)"
            )
        self.zero_pixel = get_backbone(self.spec.backbone).zero_pixel

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return class_probabilities(self.model, pooled(self.maps(pixels), self.spec.pooling), len(self.classes))

    def explain(self, pixels: np.ndarray, choose: Any) -> Explanation:
        views = self.maps(pixels)
        proba = class_probabilities(self.model, pooled(views, self.spec.pooling), len(self.classes))
        explained = choose(proba)
        found = evidence(self.model, views, self.spec.pooling, self.model.kind, explained, len(self.classes))
        grid = combined(found.views, [view.mirrored for view in self.maps.views])
        return Explanation(proba, explained, grid, found.intercepts, found.method)


class KerasExplainer:
    """A fine-tuned `.keras` model, explained by Grad-CAM on its backbone's last feature map.

    Args:
        path: the `.keras` file, its run record beside it.
    """

    def __init__(self, path: Path):
        self.record, self.model = load_finetuned(path)
        extractor = self.record["extractor"]
        self.classes = list(self.record["classes"])
        self.image_size, self.resize = int(extractor["image_size"]), str(extractor["resize"])
        backbone = self.record.get("backbone")
        self.zero_pixel = get_backbone(backbone).zero_pixel if backbone in REGISTRY else (0, 0, 0)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(pixels), dtype=np.float64)

    def explain(self, pixels: np.ndarray, choose: Any) -> Explanation:
        from cnncodes.explain.gradcam import grad_cam

        proba = self.probabilities(pixels)
        explained = choose(proba)
        k = explained.shape[1]
        found = grad_cam(self.model, np.repeat(pixels, k, axis=0), explained.ravel())
        maps = found.maps.reshape(len(pixels), k, *found.maps.shape[1:]).transpose(0, 2, 3, 1)
        return Explanation(proba, explained, maps.astype(np.float64), np.zeros(explained.shape), "grad-cam")


def load_explainer(
    model: Path | str, weights: str | None = None, runtime: str = "onnx", threads: int | None = None
) -> Explainer:
    """The explainer of a `.joblib` bundle or a fine-tuned `.keras` model.

    Args:
        model: the model file, its run record beside it.
        weights: where a bundle's weights file is now, if it moved.
        runtime: `onnx` or `keras` for a bundle's network.
        threads: caps ONNX Runtime's operator threads for a bundle's network.

    Returns:
        The explainer.

    Raises:
        CnnCodesError: not a model file, or one that cannot be loaded.
    """
    path = Path(model)
    if path.suffix.lower() == ".joblib":
        return BundleExplainer(path, weights, runtime, threads)
    if path.suffix.lower() == ".keras":
        return KerasExplainer(path)
    raise CnnCodesError(f"{model} is not a model file: give a .joblib bundle from fit-svm or a .keras model")
