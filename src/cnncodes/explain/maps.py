"""The feature maps behind a bundle's codes: its network cut at the same layer, left unpooled.

One ONNX model per scale (each one output whose shape gives the grid), converted and cached
like every extractor. They are checked against the probe fingerprint recorded with the
bundle's codes, so a map always comes from the very network the classifier was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from cnncodes.codes.spec import ExtractorSpec, WeightsSource
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import sha256_json
from cnncodes.core.progress import warn
from cnncodes.explain.readout import pool
from cnncodes.nets.models import split_layers
from cnncodes.nets.weights import Weights
from cnncodes.runtime.runners import Runner, cache_record, fingerprint, make_runner, matches, probe_batch


@dataclass(frozen=True)
class View:
    """One way the extractor sees an image: at a scale, and maybe mirrored (`--flip`)."""

    scale: int
    mirrored: bool


class FeatureMaps:
    """uint8 pixels in, each view's (images, rows, columns, channels) maps out; their pooled mean is the code.

    Args:
        spec: the extractor spec recorded with the bundle.
        weights: the weights to build the networks with on a cache miss, or the function that finds them.
        runtime: `onnx` or `keras`.
        threads: caps ONNX Runtime's operator threads.

    Raises:
        CnnCodesError: codes that are not one layer's average- or max-pooled maps, or a network that does
            not give the recorded codes.
    """

    def __init__(self, spec: ExtractorSpec, weights: WeightsSource, runtime: str = "onnx", threads: int | None = None):
        _check_mapped(spec)
        self.spec = spec
        scales = spec.scales or [spec.image_size]
        keys = {scale: sha256_json(["feature-maps", spec.network_key, scale]) for scale in scales}
        if not isinstance(weights, Weights) and not all(cache_record(key) for key in keys.values()):
            weights = weights()  # missing weights are said before a conversion starts
        self.runners: dict[int, Runner] = {
            scale: make_runner(
                partial(spec.build_maps, weights, scale),
                keys[scale],
                runtime,
                notice=warn,
                label=f"{spec.backbone}'s maps at {scale} px",
                threads=threads,
            )
            for scale in scales
        }
        self.views = [
            View(scale, mirrored) for mirrored in ((False, True) if spec.flip else (False,)) for scale in scales
        ]
        self._check_pinned()

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Each view's maps of `pixels`, in `views` order."""
        mirror = np.ascontiguousarray(pixels[:, :, ::-1]) if self.spec.flip else pixels
        return [self._maps(self.runners[v.scale], mirror if v.mirrored else pixels) for v in self.views]

    @staticmethod
    def _maps(runner: Runner, pixels: np.ndarray) -> np.ndarray:
        return runner(pixels).reshape(len(pixels), *runner.output_shape)

    def _check_pinned(self) -> None:
        """Refuse maps whose pooled outputs on the probe batch are not the codes recorded with the bundle."""
        spec = self.spec
        if spec.probe is None or spec.precision != "fp32":
            return
        probe = probe_batch((spec.image_size, spec.image_size, 3))
        codes = [pool(self._maps(self.runners[scale], probe), spec.pooling) for scale in self.runners]
        joined = np.concatenate(codes, axis=1) if spec.views else np.mean(codes, axis=0)
        if not matches(fingerprint(joined), spec.probe):
            raise CnnCodesError(
                f"{spec.backbone}'s maps made here do not give the codes this model was trained on (other weights, "
                "another Keras or a changed network): extract and fit again with this installation"
            )


def _check_mapped(spec: ExtractorSpec) -> None:
    """Refuse codes `readout` cannot split into cells: only one layer's average or maximum has a heat map."""
    if len(split_layers(spec.layer)) > 1:
        what = f"several layers' codes joined ({spec.layer}), with no one grid"
    elif spec.keep_sizes:
        what = "several sizes' codes side by side (--keep-sizes), each with its own weights"
    elif spec.pooling == "gem":
        what = "generalised means (--pooling gem), which no cell's share can be read from"
    elif spec.pooling == "flatten":
        what = "flattened maps, which have no place in the image"
    elif spec.pooling not in ("avg", "max"):
        what = f"the vector layer {spec.layer}, which has no place in the image"
    else:
        return
    raise CnnCodesError(
        f"these codes are {what}: there is no heat map; explain codes of one layer, --pooling avg or max"
    )
