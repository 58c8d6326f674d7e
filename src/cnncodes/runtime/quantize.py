"""`--precision int8`: a statically quantized copy of the cached ONNX model.

ONNX Runtime's tools quantize the fp32 model (QDQ format: int8 weights, uint8 activations)
with activation ranges calibrated on images of the train subset only, so no val or test
image ever shapes the codes. The cost of int8 depends on the network (nothing for VGG16,
measurable for MobileNetV2), so the configuration is searched, fastest first, and judged
by the codes' agreement (cosine) with fp32 codes on held-out train images: calibration
method (MinMax, percentile, entropy), per-channel weights, and keeping the most sensitive
layers in fp32. The first configuration that agrees well enough wins, else the one that
agrees best; the result is cached under a key that holds the calibration set's
fingerprint, and its agreement is recorded in `meta.json` with a one-line warning when low.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import sha256_file, sha256_json
from cnncodes.data.decode import load_square
from cnncodes.runtime.runners import (
    MeanOfViews,
    OnnxRunner,
    cache_model,
    cached_runner,
    fingerprint,
    onnx_cache_path,
    onnx_model,
    private_cache_dir,
    probe_batch,
    refuse_unpinned,
)

Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_CALIBRATION = 128
# Bump when the search or the quantization settings change: no cache keeps a model of the old ones.
FORMAT = 3
# Held-out train images that judge each configuration (a quarter of the train images when fewer).
HOLDOUT = 32
# Agreement (mean, lowest cosine with fp32 codes) that ends the search, and below which the user is warned.
# Measured on Flowers-17 with MobileNetV2: codes at 0.976 / 0.95 kept the classifiers' test accuracy
# (docs/benchmarks.md, "int8"), codes at 0.888 / 0.81 (batch norms not folded) lost 0.6-5.6 points.
GOOD = (0.97, 0.94)
LOW = (0.95, 0.9)
_BATCH = 8  # calibration images per forward pass: activation ranges are merged batch by batch


class Quantizable(Protocol):
    """What quantizing reads of an extractor (`cnncodes.codes.spec.ExtractorSpec` has all of it)."""

    @property
    def backbone(self) -> str:
        """The network's registry name, for messages and the cache record."""

    @property
    def layer(self) -> str:
        """The layer the codes come from, for messages (`backbone/layer`, as the progress bar names it)."""

    @property
    def image_size(self) -> int:
        """The side of the square images the model takes."""

    @property
    def resize(self) -> str:
        """How an image becomes a square: `crop`, `squash` or `pad`."""

    @property
    def views(self) -> int | None:
        """The codes the model gives per image, one per scale; None: one."""

    @property
    def probe(self) -> list[float] | None:
        """The fingerprint the model must reproduce on the probe batch; None: not pinned yet."""

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The calibration and held-out images (`calibration_set`)."""

    @property
    def network_key(self) -> str:
        """The cache key of the fp32 network."""

    @property
    def model_key(self) -> str:
        """The cache key of the int8 model."""


def check_precision(precision: str, calibration: int = DEFAULT_CALIBRATION) -> None:
    """Refuse an unknown precision, or an int8 calibration on no image.

    Args:
        precision: `fp32` or `int8`.
        calibration: how many train images calibrate the int8 model.

    Raises:
        CnnCodesError: saying which choice is wrong.
    """
    if precision not in PRECISIONS:
        raise CnnCodesError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if calibration < 1:
        raise CnnCodesError(f"--calibration must be at least 1 image (got {calibration})")


def check_runs_on(precision: str, runtime: str) -> None:
    """Refuse int8 on a runtime other than ONNX Runtime, the only one that runs the quantized model.

    Args:
        precision: `fp32` or `int8`.
        runtime: `onnx` or `keras`.

    Raises:
        CnnCodesError: for int8 on Keras.
    """
    if precision == "int8" and runtime != "onnx":
        raise CnnCodesError("int8 codes are made by ONNX Runtime: use --runtime onnx")


def calibration_set(train: Sequence[Path | str], n: int) -> dict[str, Any]:
    """A sample of the train images: `n` to calibrate on, up to HOLDOUT others to judge by.

    The fingerprint hashes their contents, so a changed image gives another int8 model. The
    sample is drawn by `_draw_rank`, so adding or deleting train images keeps the int8 model
    (and every code made with it) unless one of them is drawn.

    Args:
        train: the train images.
        n: how many to calibrate on.

    Returns:
        `{"n", "images", "holdout", "fingerprint"}`, as `ExtractorSpec.calibration` records it.

    Raises:
        CnnCodesError: with fewer than 2 train images.
    """
    if len(train) < 2:
        raise CnnCodesError("--precision int8 needs at least 2 train images (to calibrate and to check on)")
    ordered = sorted((os.path.abspath(p) for p in train), key=_draw_rank)  # predict may run from another folder
    held = min(HOLDOUT, max(1, len(ordered) // 4))
    holdout, images = ordered[:held], ordered[held : held + n]
    return {"n": n, "images": images, "holdout": holdout, "fingerprint": _fingerprint(images, holdout)}


def _draw_rank(path: str) -> tuple[bytes, str]:
    """A file's place in the draw: a hash of its class folder and name, the same whatever other files there are
    and wherever the dataset folder is."""
    tail = "/".join(Path(path).parts[-2:])
    return hashlib.blake2b(tail.encode("utf-8", "surrogateescape"), digest_size=8).digest(), path


def _fingerprint(images: Sequence[str], holdout: Sequence[str]) -> str:
    return sha256_json([[sha256_file(Path(p)) for p in images], [sha256_file(Path(p)) for p in holdout]])


def int8_runner(
    spec: Quantizable, build: Callable[[], Any], notice: Callable[[str], None], threads: int | None = None
) -> OnnxRunner:
    """The int8 model of `spec` on `threads` threads, from the cache or quantized now from the fp32 ONNX model.

    Args:
        spec: the extractor, its calibration set chosen.
        build: builds the Keras extractor, when the fp32 model must be converted first.
        notice: says what takes time (conversion, quantization) and a poor agreement with fp32.
        threads: ONNX Runtime's operator threads.

    Returns:
        The int8 model on ONNX Runtime, pinned to `spec.probe` when the spec has one.

    Raises:
        CnnCodesError: when the network cannot run on ONNX Runtime, or the calibration images changed.
    """
    path = onnx_cache_path(spec.model_key)
    found = cached_runner(path, spec.model_key, spec.probe, threads)
    if isinstance(found, OnnxRunner):
        return found
    if found is not None:
        notice(f"the cached int8 model {path} was refused ({found}): quantizing {spec.backbone} again")
    fp32 = onnx_model(build, spec.network_key, notice, label=f"{spec.backbone}/{spec.layer}", threads=threads)
    if isinstance(fp32, str):
        raise CnnCodesError(
            f"int8 needs {spec.backbone} on ONNX Runtime, and it cannot be converted ({fp32}): use --precision fp32"
        )
    calibration, holdout = _calibration_pixels(spec)
    notice(f"quantizing {spec.backbone} to int8 on {len(calibration)} train images, once")
    runner = _search(spec, fp32, calibration, holdout, notice, threads)
    refuse_unpinned(runner, spec.probe, f"the int8 {spec.backbone}")
    return runner


def _calibration_pixels(spec: Quantizable) -> tuple[np.ndarray, np.ndarray]:
    """The calibration and held-out images, as the model sees them, after checking they are the recorded ones."""
    cal = spec.calibration or {}
    try:
        same = _fingerprint(cal["images"], cal["holdout"]) == cal["fingerprint"]
    except (OSError, KeyError):
        same = False
    if not same:
        raise CnnCodesError(
            "the int8 model is not in this machine's cache, and the train images it was calibrated on "
            "are gone or changed: extract the codes again with --precision int8"
        )
    with ThreadPoolExecutor() as pool:

        def load(paths: Sequence[str]) -> np.ndarray:
            return np.stack(list(pool.map(lambda p: load_square(p, spec.image_size, spec.resize), paths)))

        return load(cal["images"]), load(cal["holdout"])


def _search(
    spec: Quantizable,
    fp32: OnnxRunner,
    calibration: np.ndarray,
    holdout: np.ndarray,
    notice: Callable[[str], None],
    threads: int | None,
) -> OnnxRunner:
    """Quantize in a scratch folder, publish the chosen model with what was tried, warn when it agrees poorly."""
    scratch = Path(tempfile.mkdtemp(dir=private_cache_dir(spec.model_key), prefix=".quantize-"))
    try:
        made, chosen = _best_configuration(
            _prepared(spec, scratch), fp32, calibration, holdout, scratch, threads, spec.views or 1
        )
        runner = OnnxRunner(made, threads)
        probe = fingerprint(runner(probe_batch(runner.input_shape)))
        record = {"key": spec.model_key, "model": f"{spec.backbone} int8", "probe": probe, "quantization": chosen}
        cache_model(made, onnx_cache_path(spec.model_key), record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    agreement = chosen["agreement"]
    if not _good(agreement, LOW):
        notice(
            f"int8 codes agree with fp32 codes at cosine {agreement['mean']:.3f} on average (lowest "
            f"{agreement['min']:.3f}) on {len(holdout)} held-out train images: check the accuracy, or use --precision "
            f"fp32"
        )
    return runner


def _prepared(spec: Quantizable, scratch: Path) -> Path:
    """The fp32 model with batch norms folded into their convolutions (measured: mean cosine 0.83 -> 0.975)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = scratch / "fp32.onnx"
    with _quiet():
        quant_pre_process(str(onnx_cache_path(spec.network_key)), str(model), skip_symbolic_shape=True)
    return model


def _best_configuration(
    model: Path,
    fp32: OnnxRunner,
    calibration: np.ndarray,
    holdout: np.ndarray,
    scratch: Path,
    threads: int | None,
    views: int,
) -> tuple[Path, dict[str, Any]]:
    """Try configurations fastest first: the first that agrees well enough with fp32 wins, else the best.

    Agreement is measured on the codes images are classified by: with `views`, their mean.
    """
    import onnx

    reference = MeanOfViews(fp32, views)(holdout)
    groups = sensitive_layers(onnx.load(str(model)))
    tried: list[dict[str, Any]] = []
    best: tuple[float, Path, dict[str, Any]] | None = None
    for i, config in enumerate(_configurations(groups)):
        made = scratch / f"{i}.onnx"
        _quantize(model, made, _Batches(calibration, fp32.input), config, groups, scratch)
        agreement = _agreement(MeanOfViews(OnnxRunner(made, threads), views)(holdout), reference)
        tried.append({**config, "agreement": agreement})
        good = _good(agreement, GOOD)
        if best is None or agreement["mean"] > best[0] or good:
            best = (agreement["mean"], made, tried[-1])
        if good:
            break
    assert best is not None  # the first configuration is always tried
    return best[1], {**best[2], "calibration_images": len(calibration), "holdout_images": len(holdout), "tried": tried}


def sensitive_layers(model: Any) -> dict[str, list[str]]:
    """The convolutions quantization hurts most, by name: the first, the depthwise ones and the last three.

    Args:
        model: the ONNX model (an `onnx.ModelProto`).

    Returns:
        Node names by group; groups without a node are left out.
    """
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    groups = {
        "first convolution": [n.name for n in convs[:1]],
        "depthwise convolutions": depthwise,
        "last block": [n.name for n in convs[-3:]],
    }
    return {name: nodes for name, nodes in groups.items() if nodes}


def _configurations(groups: dict[str, list[str]]) -> Iterator[dict[str, Any]]:
    """MinMax (per-channel, per-tensor, sensitive layers kept in fp32), then the slow histogram methods."""
    yield {"method": "MinMax", "per_channel": True, "fp32_layers": []}
    yield {"method": "MinMax", "per_channel": False, "fp32_layers": []}
    for name in groups:
        yield {"method": "MinMax", "per_channel": True, "fp32_layers": [name]}
    if len(groups) > 1:
        yield {"method": "MinMax", "per_channel": True, "fp32_layers": list(groups)}
    for method in ("Percentile", "Entropy"):  # each calibration takes about half a minute for MobileNetV2
        yield {"method": method, "per_channel": True, "fp32_layers": []}


def _quantize(
    fp32: Path, out: Path, calibration: _Batches, config: dict[str, Any], groups: dict[str, list[str]], scratch: Path
) -> None:
    """Static QDQ quantization; each method's activation ranges are computed once and reused from `scratch`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    excluded = [node for name in config["fp32_layers"] for node in groups[name]]
    with _quiet():
        quantize_static(
            str(fp32),
            str(out),
            calibration,
            quant_format=QuantFormat.QDQ,
            per_channel=config["per_channel"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, config["method"]),
            nodes_to_exclude=excluded,
            extra_options={"CalibStridedMinMax": 1},
            calibration_cache_path=scratch / f"{config['method']}.json",
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and advice through print() and the root logger."""
    logging.disable(logging.WARNING)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Batches:
    """ONNX Runtime's calibration reader over pixel batches; one batch per range update bounds memory."""

    def __init__(self, pixels: np.ndarray, input_name: str):
        self.batches = [{input_name: pixels[i : i + _BATCH]} for i in range(0, len(pixels), _BATCH)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.pending, None)


def _agreement(codes: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean and lowest cosine between each image's int8 and fp32 codes."""
    dot = (codes * reference).sum(axis=1)
    norms = np.linalg.norm(codes, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    return {"mean": round(float(cosine.mean()), 6), "min": round(float(cosine.min()), 6)}


def _good(agreement: dict[str, float], bar: tuple[float, float]) -> bool:
    return agreement["mean"] >= bar[0] and agreement["min"] >= bar[1]
