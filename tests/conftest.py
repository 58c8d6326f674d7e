"""Shared fixtures: small real image files written by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLOWERS = SHARED / "datasets" / "oxford17flowers"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# pytest-xdist's workers inherit COLUMNS=80, and rich fixes a console's width from it when the console
# is made (the CLI's is made on import): tests that give CliRunner a wider COLUMNS would see 80.
for _size in ("COLUMNS", "LINES"):
    os.environ.pop(_size, None)

CLASSES = ("circles", "stripes", "squares")
# The cheapest extractor that runs the whole pipeline: an untrained VGG16 on 32-px images.
FAST = {"backbone": "vgg16", "weights": "none", "image_size": 32, "progress": False}
FAST_ARGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--quiet"]


def pattern(kind: str, seed: int, size: int = 48) -> np.ndarray:
    """A distinct RGB image per seed whose shape family depends on `kind`.

    Noise keeps every file's perceptual hash different, so no two test images count as
    duplicates unless a test makes them so.
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


def write_image(path: Path, kind: str = "stripes", seed: int = 0, size: int = 48, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(kind, seed, size)).save(path, format=fmt)
    return path


def make_dataset(root: Path, per_class: int = 8, classes=CLASSES, size: int = 48) -> Path:
    """A class-per-folder dataset of PNG and JPEG files."""
    for c, kind in enumerate(classes):
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            write_image(root / kind / f"{kind}_{i:02d}.{ext}", kind, seed=100 * c + i, size=size)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Never touch the developer's ~/.keras or ~/.cache; real weights come from the `shared_data` fixture.

    The ONNX cache is shared by the whole session, so each extractor is converted once.
    """
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.getbasetemp() / "keras_home"))
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cnncodes_cache"))
    monkeypatch.delenv("CNNCODES_WEIGHTS_DIR", raising=False)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def shared_data(monkeypatch) -> None:
    """The real weights and images beside the project (../shared), found whatever the environment says.

    Their absence fails the test instead of skipping it: a skipped test proves nothing.
    """
    missing = [str(p) for p in (MOBILENET_WEIGHTS, FLOWERS, FLOWERS.parent / "DUPLICATES.tsv") if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run the tests from a checkout with ../shared beside it")
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))


needs_real_weights = pytest.mark.usefixtures("shared_data")
