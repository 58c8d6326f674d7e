"""What the test modules share besides fixtures: image and dataset writers, the cheapest extractor, the CLI runner."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

import cnncodes
from cnncodes.cli.main import app
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.finetuning.spec import TrainingSpec, make_spec

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLOWERS = SHARED / "datasets" / "oxford17flowers"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# A run record made by the release before the sub-packages (tests/data/before_packages), valid today too.
SAVED_RECORD = Path(__file__).parent / "data" / "before_packages" / "models" / "vgg16-block5_pool-logreg.json"

CLASSES = ("circles", "stripes", "squares")
# The cheapest extractor that runs the whole pipeline, an untrained VGG16 on 32-px images: `fast_spec()`.
FAST_ARGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--quiet"]

# The cheapest fine-tune on the command line, an untrained VGG16 on 32-px images: `tiny_spec()` in Python.
TINY_ARGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--batch-size", "8"]

# `cnncodes serve`: the command, the body limit of the shared `server` and its model's name in the V2 paths.
CNNCODES = Path(sys.executable).with_name("cnncodes")
MAX_BYTES = 200_000
V2_MODEL = "shapes"

# A test that reads the real weights and images beside the project (the `shared_data` fixture).
needs_real_weights = pytest.mark.usefixtures("shared_data")

runner = CliRunner()


def cli(*args: object) -> Result:
    """Run the `cnncodes` command in this process with `args` (paths and numbers included) as its words.

    Args:
        *args: the command line after `cnncodes`; each is passed as `str(arg)`.

    Returns:
        Click's result: exit code, stdout, stderr and any exception.
    """
    return runner.invoke(app, [str(a) for a in args])


def fast_spec(**changes: Any) -> ExtractorSpec:
    """The cheapest extractor that runs the whole pipeline, an untrained VGG16 on 32-px images.

    Args:
        **changes: choices of `ExtractorSpec.create` to set or replace.

    Returns:
        The spec.
    """
    return ExtractorSpec.create(**({"backbone": "vgg16", "weights": "none", "image_size": 32} | changes))


def tiny_spec(**changes: Any) -> TrainingSpec:
    """The cheapest fine-tune of both phases, an untrained VGG16 on 32-px images, one epoch each (`TINY_ARGS`).

    Args:
        **changes: choices of `make_spec` to set or replace.

    Returns:
        The spec.
    """
    tiny = dict(backbone="vgg16", weights="none", image_size=32, batch_size=8, head_epochs=1, fine_epochs=1)
    return make_spec(**(tiny | changes))


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of the whole test run, the same in every pytest-xdist worker.

    Each worker's own base folder sits in the run's; caches kept there are filled once for all workers.

    Args:
        tmp_path_factory: pytest's factory of temporary folders.

    Returns:
        The run's base folder: the workers' common parent under xdist, else the base folder itself.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def pattern(kind: str, seed: int, size: int = 48) -> np.ndarray:
    """A distinct RGB image per seed whose shape family depends on `kind`.

    Noise keeps every file's perceptual hash different, so no two test images count as
    duplicates unless a test makes them so.

    Args:
        kind: "stripes", "circles", or anything else for a checkerboard.
        seed: picks the phase, colours and noise.
        size: the image's width and height in pixels.

    Returns:
        A `size` x `size` x 3 uint8 array.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    phase = rng.uniform(0, 6.28)
    if kind == "stripes":
        base = np.sin(xx / 3.0 + phase) > 0
    elif kind == "circles":
        cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
        base = (np.hypot(xx - cx, yy - cy) / 4.0 + phase).astype(int) % 2 == 0
    else:
        base = ((xx // 8 + yy // 8 + int(phase)) % 2) == 0
    colour = rng.integers(60, 255, 3)
    img = np.where(base[..., None], colour, 255 - colour).astype(np.float64)
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def record_fields(**changes) -> dict:
    """What a method passes to `build_record`: a real record's fields, with `changes`.

    Args:
        **changes: fields to set or replace.

    Returns:
        The saved record's fields less those `build_record` stamps itself, updated with `changes`.
    """
    made = json.loads(SAVED_RECORD.read_text())
    stamped = ("format", "versions", "created", "model_file", "model_bytes", "model_sha256")
    return {k: v for k, v in made.items() if k not in stamped} | changes


def write_image(path: Path, kind: str = "stripes", seed: int = 0, size: int = 48, fmt: str | None = None) -> Path:
    """Save a `pattern` image at `path`, making its folder.

    Args:
        path: the file to write; its suffix picks the format unless `fmt` does.
        kind: the pattern's shape family.
        seed: picks the image within the family.
        size: width and height in pixels.
        fmt: a Pillow format name, for a file whose suffix does not say it.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(kind, seed, size)).save(path, format=fmt)
    return path


def make_dataset(root: Path, per_class: int = 8, classes=CLASSES, size: int = 48) -> Path:
    """A class-per-folder dataset of PNG and JPEG files.

    Args:
        root: the dataset folder to fill.
        per_class: images in each class folder.
        classes: the class names, each also the `pattern` kind of its images.
        size: width and height of every image.

    Returns:
        `root`.
    """
    for c, kind in enumerate(classes):
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            write_image(root / kind / f"{kind}_{i:02d}.{ext}", kind, seed=100 * c + i, size=size)
    return root


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (made if absent): what one xdist worker makes, the other waits for and reuses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_legacy_h5_weights(model: Any, path: Path) -> Path:
    """Write a Keras model's weights in the legacy HDF5 layout of Keras's downloadable weight files.

    Args:
        model: the Keras model.
        path: the file to write (its folder is made).

    Returns:
        `path`.
    """
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def missing_shared_data() -> None:
    """Fail the test when the real weights and images beside the project (../shared) are not there.

    Their absence fails the test instead of skipping it: a skipped test proves nothing.
    """
    missing = [str(p) for p in (MOBILENET_WEIGHTS, FLOWERS, FLOWERS.parent / "DUPLICATES.tsv") if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run the tests from a checkout with ../shared beside it")


def demo_in(folder: Path) -> dict[str, Any]:
    """`cnncodes demo --image-size 32` on 3 classes of 10 images and one file that is no image, run in `folder`
    unless it ran there already.

    Args:
        folder: where the data, the demo's folder and its output go.

    Returns:
        "data" and "out", the demo's folders, and "output", what it said (at 200 columns).
    """
    data, out, said = folder / "data", folder / "demo", folder / "demo-output.txt"
    if not said.is_file():
        make_dataset(data, per_class=10)
        (data / "circles" / "broken.jpg").write_bytes(b"not a jpeg")  # extract skips it, with a warning
        args = ["demo", str(data), "--out", str(out), "--image-size", "32"]
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        said.write_text(result.output)
    return {"data": data, "out": out, "output": said.read_text()}


def serve_bundle(folder: Path) -> Path:
    """The bundle the serving tests serve, made in `folder` unless there already.

    A MobileNetV2 (untrained, 128 px: test_classify converts the same network) with logistic regression
    on 3 classes of 6 small images (in `folder / "data"`).

    Args:
        folder: where the data, the codes and the model go.

    Returns:
        The model's file; its run record is beside it.
    """
    model = folder / "models" / "mobilenetv2-out_relu-logreg.joblib"
    if model.with_suffix(".json").is_file():  # fit-svm publishes the model before its record
        return model
    data = make_dataset(folder / "data", per_class=6, size=40)
    spec = ExtractorSpec.create(backbone="mobilenetv2", weights="none", image_size=128)
    cnncodes.extract(data, folder / "features", spec, progress=False)
    fitted = cli(
        "fit-svm", folder / "features", "--out", folder / "models", "--classifier", "logreg", "--cv", 2, "--quiet"
    )
    assert fitted.exit_code == 0, fitted.output
    return model


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(served: dict, *args: str, log: str = "server.log") -> Iterator[tuple[str, subprocess.Popen]]:
    """`cnncodes serve` of the `served` model on a free loopback port, once /readyz says so.

    Args:
        served: the `served` fixture (its model, environment, and folder for `log`).
        *args: more options of `cnncodes serve`.
        log: the file in `served["root"]` that takes the server's output.

    Yields:
        The server's URL and its process, stopped afterwards if still running.
    """
    port = free_port()
    with open(served["root"] / log, "w") as out:
        proc = subprocess.Popen(
            [str(CNNCODES), "serve", str(served["model"]), "--port", str(port), "--no-access-log", *args],
            env=served["env"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (served["root"] / log).read_text()
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 90 s"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    """The multipart `files` of a /predict request carrying `paths`."""
    return [("files", (p.name, p.read_bytes())) for p in paths]


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def fake_app(probabilities, wait_ms: float = 1, record: dict | None = None, **settings: float):
    """The app around a predictor whose forward pass is `probabilities` (32-px images, two classes).

    Args:
        probabilities: the forward pass, from a batch of pixels to each image's two probabilities.
        wait_ms: the batcher's window.
        record: the run record /metadata shows (default: a run named "fake").
        **settings: more `ServeSettings`.

    Returns:
        The FastAPI app.
    """
    from cnncodes.serving.app import create_app
    from cnncodes.serving.predict import Predictor
    from cnncodes.serving.settings import ServeSettings

    predictor = Predictor(probabilities, 32, "crop", ["a", "b"], record or {"run": "fake"})
    return create_app(predictor, ServeSettings(model="fake.joblib", batch_wait_ms=wait_ms, **settings))


def in_process(app, calls):
    """Run `calls(client)` against `app` in process, with its lifespan (the batcher and its warm-up) running."""

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await calls(client)

    return asyncio.run(run())


def io_bytes(image, image_format: str) -> bytes:
    """The file a Pillow `image` makes in `image_format`."""
    out = io.BytesIO()
    image.save(out, image_format)
    return out.getvalue()


def png_of(value: int) -> bytes:
    """A 40-px grey PNG of `value`."""
    return io_bytes(Image.new("RGB", (40, 40), (value,) * 3), "PNG")


def planted_flips(seed: int, *, n: int, classes: int, dims: int, spread: float) -> tuple[np.ndarray, ...]:
    """Gaussian classes of codes with 5 % of the labels moved to another class.

    Args:
        seed: seeds everything.
        n: codes.
        classes: classes, each centred on a random point.
        dims: numbers per code.
        spread: the centres' scale against the codes' unit noise (larger: better told apart).

    Returns:
        (codes, labels as given, true labels, indices of the moved ones).
    """
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % classes
    codes = rng.normal(size=(n, dims)) + spread * rng.normal(size=(classes, dims))[truth]
    labels = truth.copy()
    moved = rng.choice(n, size=n // 20, replace=False)
    labels[moved] = (truth[moved] + rng.integers(1, classes, len(moved))) % classes
    return codes, labels, truth, moved
