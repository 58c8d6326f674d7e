"""`finetune`: the end-to-end Keras path, scored on the same test set as the CNN codes.

Two phases, as the Keras transfer-learning guide recommends: first a new head on the frozen
backbone, then the last convolutional block unfrozen at a low learning rate, with
BatchNormalization kept in inference mode. Pixels stream through the same decoding as
`extract` (a `tf.data` pipeline over `load_square`); the saved `.keras` model takes raw RGB
pixels, so `predict` needs nothing but the file and its run record.

On a CPU most of an epoch recomputes the frozen lower layers: `cache_trunk` computes their
activations once with `extract` itself (ONNX Runtime, resumable) and trains the same layer
objects above the cut on them. `smallcnn` is the from-scratch baseline transfer learning is
measured against.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .artifacts import read_json, sha256_file, sha256_json, write_json_atomic
from .backbones import Backbone, get_backbone
from .choices import SMALL_CNN
from .errors import CnnCodesError
from .evaluate import per_image_predictions, score
from .extract import extract, plan
from .features import load_features
from .ingest import RESIZE_MODES, discover, load_square
from .progress import progress_bar
from .records import build_record, run_name
from .split import DEFAULT_FRACTIONS, SUBSETS, Split, read_split_csv
from .weights import Weights

CHECKPOINTS = ".finetune"
# --cache-trunk keeps the activations at the cut point here, so the next run with the same cut reuses them.
TRUNK_DIR = ".trunk"
SMALL_CNN_SIZE = 64
SMALL_CNN_MIN_SIZE = 8  # two 3x3 convolutions and a 2x2 pooling leave at least 2x2


def image_root(data: Path) -> Path:
    """The folder split paths are relative to: the dataset folder, or a CSV's folder (as `discover` has it)."""
    return (data.parent if data.is_file() else data).resolve()


def load_split(data: Path, out: Path, split_from: Path | None, fractions: Sequence[float], seed: int,
               progress: bool) -> Split:
    """The split of a features folder (or a split.csv) when given, else one made as `extract` makes it."""
    if split_from is None:
        the_split = plan(discover(data), out, fractions, seed, progress=progress).split
        the_split.write_csv(out / "split.csv")
        return the_split
    csv_path = split_from / "split.csv" if split_from.is_dir() else split_from
    the_split = read_split_csv(csv_path)
    missing = [p for p in the_split.paths if not (image_root(data) / p).is_file()]
    if missing:
        raise CnnCodesError(f"{len(missing)} image(s) of {csv_path} are not under {data} (e.g. {missing[0]}): "
                            "give the DATA folder the split was made from")
    return the_split


def finetune(
    data: Path | str,
    out: Path | str,
    *,
    backbone: str = "mobilenetv2",
    split_from: Path | str | None = None,
    weights: str = "imagenet",
    image_size: int | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    head_epochs: int = 5,
    fine_epochs: int = 5,
    unfreeze: str | None = None,
    head_lr: float = 1e-3,
    lr: float = 1e-5,
    dropout: float = 0.2,
    augment: bool | None = None,
    cache_trunk: bool = False,
    class_weight: str | None = None,
    patience: int = 3,
    seed: int = 0,
    name: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train backbone + new head in two phases on train, stop early on val, score once on test.

    Writes `<run>.keras` and `<run>.json` (the run record) into `out`. With `resume`, an
    interrupted run goes on from its last finished epoch (the arguments must be the same).
    `augment` defaults to on, except with `cache_trunk`, which trains on activations computed
    once. `backbone="smallcnn"` trains a small ConvNet from scratch instead, all its layers
    for `head_epochs + fine_epochs` epochs at `head_lr`.
    """
    data, out = Path(data), Path(out)
    if batch_size < 1 or min(head_lr, lr) <= 0:
        raise CnnCodesError(f"--batch-size must be at least 1 and learning rates positive "
                            f"(got {batch_size}, --head-lr {head_lr}, --lr {lr})")
    augment = not cache_trunk if augment is None else augment
    job = _Job.create(backbone, weights, image_size, resize, unfreeze, cache_trunk, augment, class_weight)
    out.mkdir(parents=True, exist_ok=True)
    the_split = load_split(data, out, Path(split_from) if split_from else None, DEFAULT_FRACTIONS, seed, progress)
    classes, labels, subsets = _labelled(the_split)
    run = run_name(name, job.backbone, "scratch" if job.entry is None else "finetune")
    keras.utils.set_random_seed(seed)
    model, network = job.build(len(classes), dropout)
    extract_seconds = None
    if cache_trunk:
        cut = cut_layer(network, job.after)
        trained = cached_top(model, network, cut)
        datasets, extract_seconds = _trunk_datasets(data, out, job, cut, trained.input_shape[1:], batch_size,
                                                    the_split, labels, subsets, seed, progress)
    else:
        trained = model
        paths = [str(image_root(data) / p) for p in the_split.paths]
        datasets = {s: _dataset(paths, labels, subsets == s, job.size, job.resize, batch_size, shuffle=s == "train",
                                augment=s == "train" and augment, seed=seed) for s in SUBSETS}
    weights_by_class = _class_weights(labels[subsets == "train"], len(classes)) if class_weight else None
    checkpoints = _checkpoints(out / CHECKPOINTS / run, resume, [
        job.backbone, job.size, resize, batch_size, head_epochs, fine_epochs, job.after, head_lr, lr, dropout, augment,
        cache_trunk, class_weight, patience, seed, job.weights.sha256, the_split.fingerprint])
    keras.utils.set_random_seed(seed)  # building a trunk extractor may have drawn numbers: same run, same draws
    started = time.perf_counter()
    history, trainable = [], {}
    for phase, after, epochs, rate in job.schedule(head_epochs, fine_epochs, head_lr, lr):
        if network is not None:
            set_trainable(network, after)
        trainable[phase] = len(trained.trainable_weights)
        history += _phase(trained, datasets, epochs, rate, weights_by_class, patience, checkpoints, phase, progress)
    fit_seconds = time.perf_counter() - started
    proba = trained.predict(datasets["test"], verbose=0)
    model_path = out / f"{run}.keras"
    _save_model(model, model_path)
    shutil.rmtree(checkpoints, ignore_errors=True)
    test_rows = subsets == "test"
    params = {"image_size": job.size, "resize": resize, "batch_size": batch_size, "head_epochs": head_epochs,
              "fine_epochs": fine_epochs, "head_lr": head_lr, "lr": lr, "dropout": dropout, "augment": augment,
              "cache_trunk": cache_trunk, "class_weight": class_weight, "patience": patience, "seed": seed,
              "trainable_weights": trainable}
    if job.entry is None:  # the small ConvNet has its own dropout layers and one phase at --head-lr
        params = {k: v for k, v in params.items() if k not in ("lr", "dropout")}
    record = build_record(
        run=run, method="finetune" if job.entry else "from-scratch", backbone=job.backbone,
        layer=f"after {job.after}" if job.entry else "all layers", classifier="dense head" if job.entry else "small ConvNet",
        params=params,
        extractor={"backbone": job.backbone, "image_size": job.size, "resize": resize, "weights": job.weights.kind,
                   "weights_sha256": job.weights.sha256},
        dataset={"data": str(image_root(data)), "split_fingerprint": the_split.fingerprint},
        classes=classes, n_train=int((subsets == "train").sum()), n_test=int(test_rows.sum()),
        **score(labels[test_rows], proba, classes),
        fit_seconds=round(fit_seconds, 3), extract_seconds=extract_seconds,
        epochs_run=len(history), history=history,
        model_file=model_path.name, model_bytes=model_path.stat().st_size, model_sha256=sha256_file(model_path),
        test_predictions=per_image_predictions([p for p, t in zip(the_split.paths, test_rows) if t],
                                               labels[test_rows], proba, classes),
    )
    write_json_atomic(model_path.with_suffix(".json"), record)
    return record


@dataclass(frozen=True)
class _Job:
    """What to train, checked before any image is read: the backbone (None for smallcnn) and its settings."""

    backbone: str
    entry: Backbone | None
    size: int
    resize: str
    weights: Weights
    after: str | None

    @classmethod
    def create(cls, backbone: str, weights: str, image_size: int | None, resize: str, unfreeze: str | None,
               cache_trunk: bool, augment: bool, class_weight: str | None) -> _Job:
        if resize not in RESIZE_MODES:
            raise CnnCodesError(f"unknown resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}")
        if class_weight not in (None, "balanced"):
            raise CnnCodesError(f"class_weight takes 'balanced' or None (got {class_weight!r})")
        if cache_trunk and augment:
            raise CnnCodesError("--cache-trunk trains on activations computed once, so it cannot augment: "
                                "drop --augment, or drop --cache-trunk")
        if backbone.lower() == SMALL_CNN:
            return cls._small_cnn(weights, image_size, resize, unfreeze, cache_trunk)
        entry = get_backbone(backbone)
        size = image_size or entry.default_size
        entry.check_size(size, entry.default_layer)
        return cls(entry.name, entry, size, resize, entry.resolve_weights(weights, entry.default_layer),
                   unfreeze or entry.finetune_after)

    @classmethod
    def _small_cnn(cls, weights: str, image_size: int | None, resize: str, unfreeze: str | None,
                   cache_trunk: bool) -> _Job:
        if weights != "none":
            raise CnnCodesError(f"{SMALL_CNN} trains from scratch and has no pretrained weights: pass --weights none")
        if unfreeze or cache_trunk:
            raise CnnCodesError(f"{SMALL_CNN} trains all its layers from scratch: "
                                "--unfreeze and --cache-trunk apply to ImageNet backbones only")
        size = image_size or SMALL_CNN_SIZE
        if size < SMALL_CNN_MIN_SIZE:
            raise CnnCodesError(f"{SMALL_CNN} needs images of at least {SMALL_CNN_MIN_SIZE} px (got --image-size {size})")
        return cls(SMALL_CNN, None, size, resize, Weights("none"), None)

    def build(self, n_classes: int, dropout: float):
        """The model to save, and the backbone inside it (None for smallcnn, which is all new)."""
        if self.entry is None:
            return small_cnn(self.size, n_classes), None
        return build_model(self.entry, self.size, n_classes, self.weights, dropout)

    def schedule(self, head_epochs: int, fine_epochs: int, head_lr: float, lr: float):
        """(phase, unfreeze after, epochs, learning rate) in order."""
        if self.entry is None:
            return [("scratch", None, head_epochs + fine_epochs, head_lr)]
        return [("head", None, head_epochs, head_lr), ("fine", self.after, fine_epochs, lr)]


def _labelled(the_split: Split) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, label indices and subsets as arrays; every subset must hold images."""
    classes = sorted(set(the_split.labels))
    subsets = np.array(the_split.subsets)
    for subset in ("train", "val", "test"):
        if not (subsets == subset).any():
            raise CnnCodesError(f"the split has no {subset} images: finetune needs train, val and test")
    return classes, np.array([classes.index(c) for c in the_split.labels]), subsets


def build_model(entry, size: int, n_classes: int, weights, dropout: float):
    """uint8 pixels -> preprocessing -> backbone (BN in inference mode) -> pooled, dropout, softmax head."""
    from .preprocessing import Preprocess

    network = entry.build_network(size, entry.default_layer, weights)
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    x = network(Preprocess(entry.name)(pixels), training=False)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    probabilities = keras.layers.Dense(n_classes, activation="softmax", name="head")(x)
    return keras.Model(pixels, probabilities, name=f"{entry.name}_finetune"), network


def small_cnn(size: int, n_classes: int):
    """The Keras MNIST example's ConvNet on uint8 RGB pixels: what transfer learning is measured against."""
    layers = keras.layers
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    x = layers.Rescaling(1 / 255, name="scale")(pixels)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Dropout(0.25, name="pool_dropout")(x)
    x = layers.Dense(128, activation="relu", name="dense")(layers.Flatten(name="flatten")(x))
    x = layers.Dropout(0.5, name="dense_dropout")(x)
    return keras.Model(pixels, layers.Dense(n_classes, activation="softmax", name="head")(x), name=SMALL_CNN)


def cached_top(model, network, cut: str):
    """The part of `model` above `cut`, taking the activations there: same layers, so training it trains `model`."""
    try:
        top = keras.Model(network.get_layer(cut).output, network.output, name=f"{network.name}_after_{cut}")
    except ValueError:  # Keras: the output is not connected to that input alone
        raise CnnCodesError(f"--cache-trunk cannot cut {network.name} after {cut!r}: layers above it also read earlier "
                            "outputs (a residual connection); give --unfreeze the last layer of a block") from None
    codes = keras.Input(top.input_shape[1:], name="trunk_codes")
    x = top(codes, training=False)
    for name in ("head_pool", "head_dropout", "head"):
        x = model.get_layer(name)(x)
    return keras.Model(codes, x, name=f"{model.name}_on_cached_trunk")


def set_trainable(network, after: str | None) -> None:
    """Freeze the backbone, or unfreeze every layer after `after` (a name or a count of last layers).

    BatchNormalization layers stay frozen either way.
    """
    network.trainable = after is not None
    if after is None:
        return
    start = _first_unfrozen(network, after)
    for i, layer in enumerate(network.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def cut_layer(network, after: str) -> str:
    """The last frozen layer of `--unfreeze after`: where `--cache-trunk` cuts the network."""
    start = _first_unfrozen(network, after)
    if start < 2:  # layer 0 is the input: nothing would be frozen, nothing to cache
        raise CnnCodesError(f"--unfreeze {after!r} leaves no frozen layer of {network.name} to cache: drop --cache-trunk")
    return network.layers[start - 1].name


def _first_unfrozen(network, after: str) -> int:
    names = [layer.name for layer in network.layers]
    if after.isdigit() and int(after) == 0:
        raise CnnCodesError("--unfreeze 0 unfreezes nothing: to train the head only, use --fine-epochs 0")
    if after.isdigit():
        return max(0, len(names) - int(after))
    if after in names:
        return names.index(after) + 1
    raise CnnCodesError(f"--unfreeze {after!r}: give a layer name of {network.name} or a number of last layers")


def augmentation(seed: int):
    """Random flips, rotations, zooms and contrast, applied in the training pipeline only.

    Kept out of the saved model, so the model exports to ONNX and predicts deterministically.
    """
    return keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seed),
                             keras.layers.RandomRotation(0.1, seed=seed), keras.layers.RandomZoom(0.1, seed=seed),
                             keras.layers.RandomContrast(0.1, seed=seed)], name="augmentation")


def _dataset(paths: list[str], labels: np.ndarray, rows: np.ndarray, size: int, resize: str, batch_size: int,
             shuffle: bool, augment: bool, seed: int):
    """A streaming tf.data pipeline: decode and resize in parallel with the same code as `extract`."""
    import tensorflow as tf

    index = np.flatnonzero(rows)
    ds = tf.data.Dataset.from_tensor_slices((index, labels[index]))
    if shuffle:
        ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True)

    def load(i):
        return load_square(paths[int(i)], size, resize)

    def decode(i, y):
        pixels = tf.numpy_function(load, [i], tf.uint8)
        pixels.set_shape((size, size, 3))
        return pixels, y

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if augment:
        layers = augmentation(seed)

        def randomise(pixels, y):
            moved = layers(tf.cast(pixels, tf.float32), training=True)
            return tf.cast(tf.clip_by_value(tf.round(moved), 0, 255), tf.uint8), y

        ds = ds.map(randomise, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _trunk_datasets(data: Path, out: Path, job: _Job, cut: str, shape: tuple[int, ...], batch_size: int,
                    the_split: Split, labels: np.ndarray, subsets: np.ndarray, seed: int,
                    progress: bool) -> tuple[dict[str, CachedRows], float]:
    """Activations at the cut, computed once by `extract` (ONNX Runtime, resumable) and kept in OUT/.trunk.

    Returns the datasets and the seconds the activations took to compute (when first made).
    """
    weights = str(job.weights.path) if job.weights.kind == "file" else job.weights.kind
    folder = out / TRUNK_DIR / f"{job.backbone}-{cut}-{job.size}-{job.resize}-{(job.weights.sha256 or 'untrained')[:12]}"
    extract(data, folder, backbone=job.backbone, layer=cut, pooling="flatten", weights=weights, image_size=job.size,
            resize=job.resize, batch_size=batch_size, seed=seed, progress=progress)
    codes = load_features(folder)
    row_of = {p: i for i, p in enumerate(codes.paths)}
    missing = [p for p in the_split.paths if p not in row_of]
    if missing:
        raise CnnCodesError(f"{len(missing)} image(s) of the split could not be read for --cache-trunk "
                            f"(e.g. {missing[0]}: see {folder / 'rejected.csv'})")
    rows = np.array([row_of[p] for p in the_split.paths])
    datasets = {s: CachedRows(codes.X, rows[subsets == s], labels[subsets == s], shape, batch_size,
                              seed if s == "train" else None) for s in SUBSETS}
    return datasets, codes.meta["elapsed_seconds"]


def _class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(n_classes) if c not in present}


def _checkpoints(folder: Path, resume: bool, arguments: list) -> Path:
    """The run's checkpoint folder: kept for --resume when the arguments match, else started afresh."""
    key = sha256_json(arguments)
    if resume and folder.is_dir():
        try:
            if read_json(folder / "arguments.json")["key"] == key:
                return folder
        except (OSError, ValueError, KeyError):
            pass
        raise CnnCodesError(f"--resume: the checkpoints in {folder} were made with other arguments; "
                            "run again without --resume to start afresh")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "arguments.json", {"key": key})
    return folder


def _phase(model, datasets, epochs: int, lr: float, class_weight, patience: int, checkpoints: Path, phase: str,
           progress: bool) -> list[dict[str, Any]]:
    """One phase: Adam at `lr`, early stopping on val accuracy (best weights kept), a backup per epoch.

    A finished phase leaves its weights and history, so a resumed run skips it; a phase
    interrupted mid-way resumes from its last backup, its history log keeping the epochs before.
    """
    done, weights = checkpoints / f"{phase}.json", checkpoints / f"{phase}.weights.h5"
    if done.is_file() and weights.is_file():
        model.load_weights(weights)
        return read_json(done)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log = HistoryLog(checkpoints / f"{phase}-history.json", phase)
    if epochs > 0:
        callbacks = [log, keras.callbacks.BackupAndRestore(str(checkpoints / f"{phase}-backup")),
                     keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=patience, restore_best_weights=True),
                     RichProgress(f"Fine-tuning ({phase})", epochs, progress)]
        model.fit(datasets["train"], validation_data=datasets["val"], epochs=epochs, shuffle=False,
                  class_weight=class_weight, callbacks=callbacks, verbose=0)  # the datasets shuffle themselves
    model.save_weights(weights)
    write_json_atomic(done, log.epochs)
    return log.epochs


class HistoryLog(keras.callbacks.Callback):
    """Every finished epoch's metrics and seconds, saved as it ends: `fit`'s own history forgets them on resume.

    It runs before BackupAndRestore, so an epoch is logged before it is backed up; one re-run
    after a crash between the two replaces its log entry.
    """

    def __init__(self, path: Path, phase: str):
        super().__init__()
        self.path, self.phase = path, phase
        self.epochs: list[dict[str, Any]] = read_json(path) if path.is_file() else []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        entry = {"phase": self.phase, "epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                 "seconds": round(time.perf_counter() - self.started, 3)}
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1] + [entry]
        write_json_atomic(self.path, self.epochs)


class CachedRows(keras.utils.PyDataset):
    """Batches of cached trunk activations read from the memory-mapped codes; reshuffled each epoch when seeded."""

    def __init__(self, codes: np.ndarray, rows: np.ndarray, labels: np.ndarray, shape: Sequence[int],
                 batch_size: int, seed: int | None = None):
        super().__init__()
        self.codes, self.rows, self.labels, self.shape, self.batch_size = codes, rows, labels, tuple(shape), batch_size
        self.rng = None if seed is None else np.random.default_rng(seed)
        self.order = np.arange(len(rows))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, i: int):
        take = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        return self.codes[self.rows[take]].reshape(-1, *self.shape), self.labels[take]

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.rows))


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


class RichProgress(keras.callbacks.Callback):
    """A rich bar per epoch: batches done, rate and ETA."""

    def __init__(self, description: str, epochs: int, enabled: bool):
        super().__init__()
        self.description, self.epochs, self.enabled = description, epochs, enabled

    def on_epoch_begin(self, epoch, logs=None):
        self._bar = progress_bar(f"{self.description} epoch {epoch + 1}/{self.epochs}",
                                 self.params.get("steps") or 0, unit="batch", enabled=self.enabled)
        self._advance = self._bar.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        self._advance(1)

    def on_epoch_end(self, epoch, logs=None):
        self._bar.__exit__(None, None, None)
