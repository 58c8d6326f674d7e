"""What the test modules share besides fixtures: image and dataset writers, the cheapest extractor, the CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from cnncodes.cli.main import app
from cnncodes.codes.spec import ExtractorSpec

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLOWERS = SHARED / "datasets" / "oxford17flowers"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# A run record made by the release before the sub-packages (tests/data/before_packages), valid today too.
SAVED_RECORD = Path(__file__).parent / "data" / "before_packages" / "models" / "vgg16-block5_pool-logreg.json"

CLASSES = ("circles", "stripes", "squares")
# The cheapest extractor that runs the whole pipeline, an untrained VGG16 on 32-px images: `fast_spec()`.
FAST_ARGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--quiet"]

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
