"""`finetune --preview-augmentation`: what the training pipeline's augmentation makes of a few images, as one PNG.

Augmentation that turns a flower upside down or washes out its colour teaches the wrong
invariances; a look before hours of training shows it. The draws come from the pipeline's
own function (`data.augmenter`), with the run's seed, so the picture is what training sees.
"""

from __future__ import annotations

import io
from itertools import chain, zip_longest
from pathlib import Path

import numpy as np
from PIL import Image

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import make_folder, write_bytes_atomic
from cnncodes.data.decode import BadImage, load_square
from cnncodes.data.ingest import discover
from cnncodes.finetuning.data import augmenter
from cnncodes.finetuning.spec import TrainingSpec

PREVIEW_FILE = "augmentation.png"
# Pixels between tiles, white.
GAP = 4


def preview_augmentation(
    data: Path | str, folder: Path | str, spec: TrainingSpec, *, images: int = 4, draws: int = 6
) -> Path:
    """Write `folder/augmentation.png`: a row per image, the image as decoded first, then `draws` augmented draws.

    Without augmentation (`spec.augment` false) every draw is the image as decoded, as training sees it.

    Args:
        data: a class-per-folder directory or a `path,label` CSV.
        folder: where to write the PNG (made if needed).
        spec: the fine-tune's settings: image size, resize mode, seed and whether it augments.
        images: how many images, taken from each class in turn (unreadable ones passed over).
        draws: random draws per image.

    Returns:
        The PNG's path.

    Raises:
        CnnCodesError: `images` or `draws` below 1, or no readable image.
    """
    if images < 1 or draws < 1:
        raise CnnCodesError(f"the preview needs at least one image and one draw (got {images} and {draws})")
    pixels = _first_images(Path(data), spec, images)
    augment = augmenter(spec.seed) if spec.augment else np.asarray
    columns = [pixels] + [np.asarray(augment(pixels)) for _ in range(draws)]
    size = spec.image_size
    step = size + GAP
    sheet = np.full((len(pixels) * step - GAP, len(columns) * step - GAP, 3), 255, np.uint8)
    for c, column in enumerate(columns):
        for r, tile in enumerate(column):
            sheet[r * step : r * step + size, c * step : c * step + size] = tile
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    make_folder(Path(folder))
    path = Path(folder) / PREVIEW_FILE
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _first_images(data: Path, spec: TrainingSpec, n: int) -> np.ndarray:
    """The first `n` readable images of the dataset, a class at a time in turn, as the pipeline decodes them."""
    dataset = discover(data)
    by_class = [[p for p, label in zip(dataset.paths, dataset.labels) if label == c] for c in dataset.classes]
    pixels = []
    for path in chain.from_iterable(zip_longest(*by_class)):
        if path is not None:
            try:
                pixels.append(load_square(Path(dataset.root) / path, spec.image_size, spec.resize))
            except BadImage:
                continue
            if len(pixels) == n:
                break
    if not pixels:
        raise CnnCodesError(f"no readable image in {data} to preview")
    return np.stack(pixels)
