"""What a fine-tune trains on: the split, its labels, and the batches of each subset.

Pixels stream through the same decoding as `extract` (a `tf.data` pipeline over
`load_square`). With `--cache-trunk`, the batches are instead the frozen layers'
activations, computed once by `extract` itself (ONNX Runtime, resumable) and read back from
the memory-mapped codes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnncodes.codes.extract import extract
from cnncodes.codes.features import load_features, recorded_split
from cnncodes.codes.layout import META_FILE, REJECTED_FILE, SPLIT_FILE, skipped_summary
from cnncodes.codes.plan import plan
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.progress import warn
from cnncodes.data.decode import BadImage, load_square
from cnncodes.data.ingest import discover
from cnncodes.data.split import SUBSETS, Split, label_indices, read_split_csv
from cnncodes.finetuning.spec import FinetuneSpec, TrainingSpec

# --cache-trunk keeps the activations at the cut point here, so the next run with the same cut reuses them.
TRUNK_DIR = ".trunk"


def image_root(data: Path) -> Path:
    """The folder split paths are relative to: the dataset folder, or a CSV's folder (as `discover` has it).

    Args:
        data: a class-per-folder directory or a `path,label` CSV.

    Returns:
        The folder, resolved.
    """
    return (data.parent if data.is_file() else data).resolve()


def load_split(
    data: Path,
    out: Path,
    split_from: Path | None,
    fractions: Sequence[float],
    seed: int,
    dup_threshold: int,
    progress: bool,
) -> Split:
    """The split of a features folder (or a split.csv) when given, else one made as `extract` makes it.

    Args:
        data: the images.
        out: the models folder, whose split.csv the split made here must agree with.
        split_from: a features folder or a split.csv, or None to make the split.
        fractions: train, val and test fractions of the split made here.
        seed: its seed.
        dup_threshold: its duplicate threshold.
        progress: rich progress bars.

    Returns:
        The split.

    Raises:
        CnnCodesError: `out` is a features folder, its split.csv is another split, the split.csv of a
            features folder is not the one its meta.json recorded, or images of the given split are not
            under `data`.
    """
    if split_from is None:
        return _made_split(data, out, fractions, seed, dup_threshold, progress)
    csv_path = split_from / SPLIT_FILE if split_from.is_dir() else split_from
    features = csv_path.parent
    codes_split = csv_path.name == SPLIT_FILE and (features / META_FILE).is_file()  # checked against meta.json
    the_split = recorded_split(features) if codes_split else read_split_csv(csv_path)
    root = image_root(data)
    missing = [p for p in the_split.paths if not (root / p).is_file()]
    if missing:
        raise CnnCodesError(
            f"{len(missing)} image(s) of {csv_path} are not under {data} (e.g. {missing[0]}): "
            "give the DATA folder the split was made from"
        )
    return the_split


def _made_split(
    data: Path, out: Path, fractions: Sequence[float], seed: int, dup_threshold: int, progress: bool
) -> Split:
    """The split `extract` would make, with its warnings; the same as that of the folder's other runs."""
    if (out / META_FILE).is_file():  # its split.csv belongs to its codes
        raise CnnCodesError(
            f"{out} is a features folder: give finetune another --out, and --split-from {out} to use its split"
        )
    planned = plan(discover(data), out, fractions=fractions, seed=seed, dup_threshold=dup_threshold, progress=progress)
    for warning in planned.split.warnings:  # as extract warns: a class missing from a subset, mixed duplicates
        warn(warning)
    if planned.rejected:  # `plan` listed them in OUT/rejected.csv
        warn(skipped_summary(planned.rejected, out / REJECTED_FILE))
    kept = out / SPLIT_FILE  # written with the run, once it is not refused
    if kept.is_file() and read_split_csv(kept).fingerprint != planned.split.fingerprint:
        raise CnnCodesError(
            f"{kept} holds the split of this folder's other runs, and this one would be another (other images, "
            f"--split, --split-seed or --dup-threshold): give another --out, or --split-from {kept} to use it"
        )
    return planned.split


def labelled(the_split: Split) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, label indices and subsets as arrays; every subset must hold images.

    Args:
        the_split: the split to train, stop early and score on.

    Returns:
        The sorted class names, each image's class index and each image's subset.

    Raises:
        CnnCodesError: a subset without images.
    """
    classes = sorted(set(the_split.labels))
    subsets = np.array(the_split.subsets)
    for subset in SUBSETS:
        if not (subsets == subset).any():
            raise CnnCodesError(f"the split has no {subset} images: finetune needs train, val and test")
    return classes, label_indices(the_split.labels, classes), subsets


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """Keras's `class_weight` that balances the classes of `y`; a class absent from it weighs 1.

    Args:
        y: the training labels.
        n_classes: all classes of the run.

    Returns:
        A weight for every class index.
    """
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(n_classes) if c not in present}


def augmentation(seed: int) -> keras.Sequential:
    """Random flips, rotations, zooms and contrast, applied in the training pipeline only.

    Kept out of the saved model, so the model exports to ONNX and predicts deterministically.

    Args:
        seed: the layers' seed.

    Returns:
        The layers, to call with `training=True` on float pixels.
    """
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
            keras.layers.RandomContrast(0.1, seed=seed),
        ],
        name="augmentation",
    )


def augmenter(seed: int) -> Callable[[Any], Any]:
    """The training pipeline's augmentation of uint8 batches, each call a new random draw.

    Args:
        seed: the layers' seed (`augmentation`).

    Returns:
        A function of a (batch, size, size, 3) uint8 tensor that gives one of the same shape and type.
    """
    import tensorflow as tf

    layers = augmentation(seed)

    def augment(pixels: Any) -> Any:
        moved = layers(tf.cast(pixels, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(moved), 0, 255), tf.uint8)

    return augment


def image_dataset(
    paths: list[str], labels: np.ndarray, rows: np.ndarray, spec: TrainingSpec, train: bool, unreadable: list[str]
) -> Any:
    """A streaming tf.data pipeline: decode and resize in parallel with the same code as `extract`.

    Args:
        paths: every image of the split.
        labels: their class indices.
        rows: a mask of the images of this subset.
        spec: the image size, resize mode, batch size, seed and augmentation.
        train: reshuffle every epoch and, when the spec says so, augment.
        unreadable: gets each image that fails to decode (TensorFlow's own error does not say which).

    Returns:
        A `tf.data.Dataset` of (uint8 pixels, label) batches.
    """
    import tensorflow as tf

    size = spec.image_size
    index = np.flatnonzero(rows)
    ds = tf.data.Dataset.from_tensor_slices((index, labels[index]))
    if train:
        ds = ds.shuffle(len(index), seed=spec.seed, reshuffle_each_iteration=True)

    def load(i):
        try:
            return load_square(paths[int(i)], size, spec.resize)
        except BadImage as e:
            unreadable.append(f"{paths[int(i)]} ({e})")
            raise

    def decode(i, y):
        pixels = tf.numpy_function(load, [i], tf.uint8)
        pixels.set_shape((size, size, 3))
        return pixels, y

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(spec.batch_size)
    if train and spec.augment:
        augment = augmenter(spec.seed)
        ds = ds.map(lambda pixels, y: (augment(pixels), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class CachedRows(keras.utils.PyDataset):
    """Batches of cached trunk activations read from the memory-mapped codes; reshuffled each epoch when seeded.

    Args:
        codes: the flattened activations of every image extracted.
        rows: the rows of `codes` in this subset, in split order.
        labels: their class indices.
        shape: the shape of one activation, as the model above the cut takes it.
        batch_size: rows per batch.
        seed: shuffle the rows each epoch from this seed; None keeps their order.
    """

    def __init__(
        self,
        codes: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        shape: Sequence[int],
        batch_size: int,
        seed: int | None = None,
    ):
        super().__init__()
        self.codes, self.rows, self.labels, self.shape, self.batch_size = codes, rows, labels, tuple(shape), batch_size
        self.rng = None if seed is None else np.random.default_rng(seed)
        self.order = np.arange(len(rows))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        take = np.sort(self.order[i * self.batch_size : (i + 1) * self.batch_size])
        return self.codes[self.rows[take]].reshape(-1, *self.shape), self.labels[take]

    def on_epoch_end(self) -> None:
        """Draw the next epoch's order, when seeded."""
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.rows))


def trunk_datasets(
    data: Path,
    out: Path,
    spec: FinetuneSpec,
    cut: str,
    shape: tuple[int, ...],
    the_split: Split,
    labels: np.ndarray,
    subsets: np.ndarray,
    progress: bool,
) -> tuple[dict[str, CachedRows], float]:
    """Activations at the cut, computed once by `extract` (ONNX Runtime, resumable) and kept in OUT/.trunk.

    Args:
        data: the images.
        out: the models folder.
        spec: the backbone, weights, image size, resize mode, batch size and seed.
        cut: the backbone's last frozen layer.
        shape: the shape of one activation there.
        the_split: the split; every image of it must have been read.
        labels: the class index of each image of the split.
        subsets: the subset of each image of the split.
        progress: rich progress bars.

    Returns:
        The batches of each subset, and the seconds the activations took to compute (when first made).

    Raises:
        CnnCodesError: an image of the split that `extract` could not read.
    """
    folder = _trunk_folder(out, spec, cut)
    weights = spec.weights
    extractor = ExtractorSpec.create(
        backbone=spec.backbone,
        layer=cut,
        pooling="flatten",
        weights=str(weights.path) if weights.kind == "file" else weights.kind,
        image_size=spec.image_size,
        resize=spec.resize,
    )
    extract(data, folder, extractor, batch_size=spec.batch_size, progress=progress)
    codes = load_features(folder)
    rows = _rows_of_split(image_root(data), codes.paths, the_split, folder)
    datasets = {
        s: CachedRows(
            codes.X,
            rows[subsets == s],
            labels[subsets == s],
            shape,
            spec.batch_size,
            spec.seed if s == "train" else None,
        )
        for s in SUBSETS
    }
    return datasets, codes.meta["elapsed_seconds"]


def _trunk_folder(out: Path, spec: FinetuneSpec, cut: str) -> Path:
    """Where the activations at `cut` are kept: one folder per backbone, cut, input and weights."""
    weights = (spec.weights.sha256 or "untrained")[:12]
    return out / TRUNK_DIR / f"{spec.backbone}-{cut}-{spec.image_size}-{spec.resize}-{weights}"


def _rows_of_split(root: Path, extracted: Sequence[str], the_split: Split, folder: Path) -> np.ndarray:
    """The row of the extracted codes of each image of the split.

    Both name images from their own folder: a split made from a CSV names "../images/a.png",
    the codes extracted from DATA "a.png", so both are compared as paths under `root`.
    """

    def where(path: str) -> str:
        return os.path.normpath(os.path.join(root, path))

    row_of = {where(p): i for i, p in enumerate(extracted)}
    places = [where(p) for p in the_split.paths]
    missing = [p for p, place in zip(the_split.paths, places) if place not in row_of]
    if missing:
        raise CnnCodesError(
            f"{len(missing)} image(s) of the split could not be read for --cache-trunk "
            f"(e.g. {missing[0]}: see {folder / REJECTED_FILE})"
        )
    return np.array([row_of[place] for place in places])
