"""`ExtractorSpec`: everything that decides the code of an image, recorded in meta.json and every bundle.

The dict form (`to_dict`, `from_dict`) is what users' features folders, run records and
bundles hold: its fields and their meaning stay as they are, and a spec of another
`EXTRACTOR_FORMAT` is refused rather than rebuilt differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from operator import index
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.core import files as artifacts
from cnncodes.core.errors import CnnCodesError, check_types
from cnncodes.core.progress import warn
from cnncodes.data.decode import check_resize
from cnncodes.nets.backbones import DEFAULT_BACKBONE, POOLINGS, get_backbone
from cnncodes.nets.models import check_layers, split_layers
from cnncodes.nets.weights import WEIGHTS_DIR_ENV, Weights
from cnncodes.runtime import quantize
from cnncodes.runtime.runners import (
    MeanOfViews,
    MirrorAveraged,
    Runner,
    cache_record,
    check_can_convert,
    make_runner,
)

# Bump when the way an extractor is built changes, so no cache keeps codes of the old build.
EXTRACTOR_FORMAT = 1
# The weights a network is built with, or a function that finds them when it is built (not for a cached model).
WeightsSource = Weights | Callable[[], Weights]


@dataclass(frozen=True, kw_only=True)
class ExtractorSpec:
    """Everything that decides the code of an image; `predict` rebuilds the extractor from it.

    Make one with `ExtractorSpec.create`, which checks the choices and resolves the weights
    file; `from_dict` reads one back from meta.json or a bundle.
    """

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
    # With several scales: the image's code is every scale's code side by side, not their mean.
    keep_sizes: bool = False
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
        *,
        backbone: str = DEFAULT_BACKBONE,
        layer: str | None = None,
        pooling: str = "avg",
        image_size: int | str | Sequence[int] | None = None,
        resize: str = "crop",
        weights: str = "imagenet",
        flip: bool = False,
        keep_sizes: bool = False,
        precision: str = "fp32",
        calibration: int = quantize.DEFAULT_CALIBRATION,
    ) -> ExtractorSpec:
        """Check the user's choices and resolve the weights file, with its SHA-256.

        TensorFlow is loaded only to check a layer that is not one of the registry's taps.

        Args:
            backbone: a registry name (`cnncodes backbones` lists them).
            layer: the layer whose output is the code (default: the registry's deepest tap), or several
                joined by commas ("a,b"), whose pooled codes are each L2-normalised and concatenated.
            pooling: `avg`, `max`, `gem` (generalised mean, p = 3) or `flatten` (one layer only).
            image_size: square input size, or several whose codes are averaged ("224,288" or a
                sequence; default: the backbone's).
            resize: `crop`, `squash` or `pad`.
            weights: `imagenet`, `none` (untrained, seeded) or the path of a Keras weights file.
            flip: average each code with that of the mirror image (twice the forward passes).
            keep_sizes: with several sizes, concatenate their codes instead of averaging them (the
                scale that tells textures apart is kept; the code is as many times longer).
            precision: `fp32`, or `int8`: a quantized model calibrated on `calibration` train images.
            calibration: how many train images calibrate the int8 model.

        Returns:
            The spec, its weights resolved (`recorded_weights`).

        Raises:
            CnnCodesError: for a choice the backbone does not take, or weights that cannot be found.
        """
        check_types(flip=(flip, bool), keep_sizes=(keep_sizes, bool), calibration=(calibration, int))
        quantize.check_precision(precision, calibration)
        entry = get_backbone(backbone)
        if pooling not in POOLINGS:
            raise CnnCodesError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        names = split_layers(layer or entry.default_layer)
        check_layers(entry, names, pooling)
        layer = ",".join(names)  # several layers hold no top's layer: sizes and weights are judged as for one
        check_resize(resize)
        sizes = input_sizes(image_size, entry.default_sizes(pooling, layer))
        entry.check_sizes(sizes, layer)
        if keep_sizes and len(sizes) < 2:
            raise CnnCodesError(
                "--keep-sizes keeps the codes of several sizes: give them, e.g. --image-size 224,288,384"
            )
        averaged = [what for what, on in (("--flip", flip), ("several --image-size", len(sizes) > 1)) if on]
        if averaged and pooling == "flatten" and not entry.needs_top(layer):
            raise CnnCodesError(
                f"averaging an image's codes ({' and '.join(averaged)}) only makes sense for pooled codes: "
                "use --pooling avg or max"
            )
        resolved = entry.resolve_weights(weights, layer)
        return cls(
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
            views=len(sizes) if len(sizes) > 1 and not keep_sizes else None,
            keep_sizes=keep_sizes,
            precision=precision,
            calibration={"n": calibration} if precision == "int8" else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractorSpec:
        """The spec recorded in meta.json or a bundle; one made by another version of cnncodes is refused in one line.

        Args:
            data: the recorded dict (`to_dict`); specs saved before the format was recorded are format 1.

        Returns:
            The spec.

        Raises:
            CnnCodesError: for another format, unknown fields, or a missing one.
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
        """The spec as meta.json and bundles record it, every field by name (`keep_sizes` only when set).

        Sizes averaged are recorded as they were before they could be kept, so the records of
        every earlier setting are unchanged.
        """
        recorded = asdict(self)
        if not self.keep_sizes:
            del recorded["keep_sizes"]
        return recorded

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
        """int8's fingerprint of the calibration images' contents, once chosen (`calibrated`); else None."""
        return (self.calibration or {}).get("fingerprint")

    @property
    def key(self) -> str:
        """Equal keys mean equal codes; fp32 codes without --flip keep the keys they had before either existed."""
        return artifacts.sha256_json([self.model_key, "flip"]) if self.flip else self.model_key

    @property
    def recorded_weights(self) -> Weights:
        """The weights as this spec records them, trusted without reading the file again.

        Right for a spec `create` has just made (it found and hashed the file); a spec read
        back from meta.json or a bundle finds them with `find_weights`, which checks the file.
        """
        return Weights(self.weights, Path(self.weights_file) if self.weights_file else None, self.weights_sha256)

    def calibrated(self, train: Sequence[Path | str]) -> ExtractorSpec:
        """For int8, the calibration and held-out images, chosen among `train` (never val or test images).

        Args:
            train: the train images.

        Returns:
            This spec with its calibration set chosen; an fp32 spec as it is.
        """
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
        """The weights these codes were made with, found again (or at `override`) and checked by SHA-256.

        ImageNet weights are looked for first where `extract` found them (the recorded file, if
        it is still the same), then as `extract` looks for them. Errors advise what the commands
        that rebuild a model take (`predict`, `serve`, `prepare`): other weights are refused there.

        Args:
            override: where the weights file is now, when it moved.

        Returns:
            The weights, their file checked.

        Raises:
            CnnCodesError: when the file is gone or is not the one recorded.
        """
        if self.weights == "none":
            return Weights("none")
        entry = get_backbone(self.backbone)
        if self.weights == "imagenet":
            advice = (
                f"pass --weights PATH with the file this model was made with (SHA-256 {self.weights_sha256}), "
                f"or put it in ${WEIGHTS_DIR_ENV}"
            )
        else:
            advice = f"give its new place with --weights PATH (its SHA-256: {self.weights_sha256})"
        if override:
            found = entry.resolve_weights(override, self.layer, advice=advice)
        elif self.weights == "file":
            if not Path(self.weights_file or "").is_file():
                raise CnnCodesError(
                    f"this model was made with the weights file {self.weights_file}, which is not there any more: "
                    f"{advice}"
                )
            found = entry.resolve_weights(self.weights_file or "", self.layer, advice=advice)
        else:
            recorded = self._recorded_file()
            if isinstance(recorded, Weights):
                return recorded
            found = entry.resolve_weights("imagenet", self.layer, tried=recorded, advice=advice)
        if found.sha256 != self.weights_sha256:
            raise CnnCodesError(
                f"the weights {found.path or override} are not the ones this model was made with "
                f"({self.weights_file}, SHA-256 {self.weights_sha256}): give the right file with --weights PATH"
            )
        return found

    def _recorded_file(self) -> Weights | str:
        """The weights at the recorded path if they are still the recorded ones (read once); else what became of it."""
        if not self.weights_file:
            return ""
        path = Path(self.weights_file)
        if not path.is_file():
            return f"{path}, where extract found them, is gone; "
        if artifacts.sha256_file(path) != self.weights_sha256:
            return f"{path}, where extract found them, has changed since; "
        return self.recorded_weights

    def build(self, weights: WeightsSource):
        """The Keras extractor: uint8 pixels in, codes out.

        Args:
            weights: the weights to load (`recorded_weights` or `find_weights`), or the function
                that finds them (called here).

        Returns:
            The Keras model.
        """
        from cnncodes.nets.models import build_extractor

        entry = get_backbone(self.backbone)
        loaded = weights if isinstance(weights, Weights) else weights()
        return build_extractor(
            entry,
            self.image_size,
            self.layer,
            self.pooling,
            loaded,
            self.scales or (),
            bool(self.views or self.keep_sizes),
        )

    def build_maps(self, weights: WeightsSource, scale: int):
        """The Keras model of the unpooled maps behind the code at one of its scales (see `build_feature_maps`).

        Args:
            weights: as for `build`.
            scale: one of the spec's scales (its `image_size` for one-size codes).

        Returns:
            The Keras model: uint8 pixels in, (rows, columns, channels) maps out.
        """
        from cnncodes.nets.models import build_feature_maps

        entry = get_backbone(self.backbone)
        loaded = weights if isinstance(weights, Weights) else weights()
        return build_feature_maps(entry, self.image_size, self.layer, loaded, scale, any_size=bool(self.scales))

    def runner(
        self, weights: WeightsSource, runtime: str = "onnx", threads: int | None = None, per_view: bool = False
    ) -> Runner:
        """The extractor on `runtime`, at its precision; with a cached ONNX model, TensorFlow is never loaded.

        On a cache miss the network is converted in a child process (and quantized for int8), so
        calling this ahead of time, e.g. in a container build, prepares the cache. A prepared
        model needs no weights file: the cached ONNX model, pinned by `probe`, is the network.

        Args:
            weights: the weights to build the network with on a cache miss, or a picklable function
                that finds them (`find_weights`), called only when the network is built.
            runtime: `onnx` or `keras`.
            threads: caps ONNX Runtime's operator threads (a server process, a Ray actor).
            per_view: every view's code side by side, as `extract` stores them; else the images' codes.

        Returns:
            The runner: uint8 pixels in, codes out.
        """
        quantize.check_runs_on(self.precision, runtime)
        if not isinstance(weights, Weights) and not any(cache_record(k) for k in {self.model_key, self.network_key}):
            if runtime == "onnx":
                check_can_convert(self.backbone)
            weights = weights()  # the network will be built: missing weights are said before a conversion starts
        build = partial(self.build, weights)  # picklable: the conversion runs in a child process
        if self.precision == "int8":
            found: Runner = quantize.int8_runner(self, build, notice=warn, threads=threads)
        else:
            found = make_runner(
                build,
                self.network_key,
                runtime,
                notice=warn,
                pin=self.probe,
                label=f"{self.backbone}/{self.layer}",  # as its progress bar says: a trunk is another network
                threads=threads,
            )
        found = MirrorAveraged(found) if self.flip else found
        return MeanOfViews(found, self.views) if self.views and not per_view else found

    def prepare(self, weights: Weights | None = None) -> None:
        """Convert (and for int8 quantize) this extractor into the cache ahead of time, e.g. in a container build.

        Args:
            weights: the weights to build with; default: found again and checked (`find_weights`) if
                the cache does not hold the model yet.
        """
        self.runner(weights or self.find_weights)


def input_sizes(image_size: int | str | Sequence[int] | None, default: list[int]) -> list[int]:
    """The square sizes an image is seen at, smallest first.

    Args:
        image_size: one size, several, or several as text ("224,288"); None: `default`.
        default: the backbone's sizes.

    Returns:
        The sizes, sorted, each once.

    Raises:
        CnnCodesError: for anything but positive whole sizes.
    """
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
