"""`finetune`: the end-to-end Keras path, scored on the same test set as the CNN codes.

Two phases, as the Keras transfer-learning guide recommends: first a new head on the frozen
backbone, then the last convolutional block unfrozen at a low learning rate, with
BatchNormalization kept in inference mode. Pixels stream through the same decoding as
`extract` (a `tf.data` pipeline over `load_square`); the saved `.keras` model takes raw RGB
pixels, so `predict` needs nothing but the file and its run record.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .artifacts import read_json, sha256_file, sha256_json, write_json_atomic
from .backbones import get_backbone
from .errors import CnnCodesError
from .evaluate import per_image_predictions, run_record, score
from .extract import plan
from .ingest import RESIZE_MODES, load_square
from .progress import progress_bar
from .split import DEFAULT_FRACTIONS, Split, read_split_csv

CHECKPOINTS = ".finetune"


def image_root(data: Path) -> Path:
    """The folder split paths are relative to: the dataset folder, or a CSV's folder (as `discover` has it)."""
    return (data.parent if data.is_file() else data).resolve()


def load_split(data: Path, out: Path, split_from: Path | None, fractions: Sequence[float], seed: int,
               progress: bool) -> Split:
    """The split of a features folder (or a split.csv) when given, else one made as `extract` makes it."""
    if split_from is None:
        the_split = plan(data, out, fractions, seed, progress=progress).split
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
    augment: bool = True,
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
    """
    data, out = Path(data), Path(out)
    entry = get_backbone(backbone)
    size = image_size or entry.default_size
    entry.check_size(size, entry.default_layer)
    if resize not in RESIZE_MODES:
        raise CnnCodesError(f"unknown resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}")
    if class_weight not in (None, "balanced"):
        raise CnnCodesError(f"class_weight takes 'balanced' or None (got {class_weight!r})")
    resolved = entry.resolve_weights(weights, entry.default_layer)
    out.mkdir(parents=True, exist_ok=True)
    the_split = load_split(data, out, Path(split_from) if split_from else None, DEFAULT_FRACTIONS, seed, progress)
    classes, labels, subsets = _labelled(the_split)
    run = f"{name + '-' if name else ''}{entry.name}-finetune"
    keras.utils.set_random_seed(seed)
    model, network = build_model(entry, size, len(classes), resolved, dropout)
    paths = [str(image_root(data) / p) for p in the_split.paths]
    datasets = {s: _dataset(paths, labels, subsets == s, size, resize, batch_size, shuffle=s == "train",
                            augment=s == "train" and augment, seed=seed)
                for s in ("train", "val", "test")}
    weights_by_class = _class_weights(labels[subsets == "train"], len(classes)) if class_weight else None
    checkpoints = _checkpoints(out / CHECKPOINTS / run, resume, [
        backbone, size, resize, batch_size, head_epochs, fine_epochs, unfreeze, head_lr, lr, dropout, augment,
        class_weight, patience, seed, resolved.sha256, the_split.fingerprint])
    started = time.perf_counter()
    frozen = set_trainable(network, None)
    history = _phase(model, datasets, head_epochs, head_lr, weights_by_class, patience, checkpoints, "head", progress)
    unfrozen = set_trainable(network, unfreeze or entry.finetune_after)
    history += _phase(model, datasets, fine_epochs, lr, weights_by_class, patience, checkpoints, "fine", progress)
    fit_seconds = time.perf_counter() - started
    proba = model.predict(datasets["test"], verbose=0)
    model_path = out / f"{run}.keras"
    _save_model(model, model_path)
    shutil.rmtree(checkpoints, ignore_errors=True)
    test_rows = subsets == "test"
    record = run_record(
        run=run, method="finetune", backbone=entry.name, layer=f"after {unfreeze or entry.finetune_after}",
        classifier="dense head",
        params={"image_size": size, "resize": resize, "batch_size": batch_size, "head_epochs": head_epochs,
                "fine_epochs": fine_epochs, "head_lr": head_lr, "lr": lr, "dropout": dropout, "augment": augment,
                "class_weight": class_weight, "patience": patience, "seed": seed,
                "trainable_backbone_weights": {"head": frozen, "fine": unfrozen}},
        extractor={"backbone": entry.name, "image_size": size, "resize": resize, "weights": resolved.kind,
                   "weights_sha256": resolved.sha256},
        dataset={"data": str(image_root(data)), "split_fingerprint": the_split.fingerprint},
        classes=classes, n_train=int((subsets == "train").sum()), n_test=int(test_rows.sum()),
        **score(labels[test_rows], proba, classes),
        fit_seconds=round(fit_seconds, 3), extract_seconds=None, epochs_run=len(history), history=history,
        model_file=model_path.name, model_bytes=model_path.stat().st_size, model_sha256=sha256_file(model_path),
        test_predictions=per_image_predictions([p for p, t in zip(the_split.paths, test_rows) if t],
                                               labels[test_rows], proba, classes),
    )
    write_json_atomic(model_path.with_suffix(".json"), record)
    return record


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


def set_trainable(network, after: str | None) -> int:
    """Freeze the backbone, or unfreeze every layer after `after` (a name or a count of last layers).

    BatchNormalization layers stay frozen either way. Returns the number of trainable
    backbone weights.
    """
    network.trainable = after is not None
    if after is None:
        return 0
    names = [layer.name for layer in network.layers]
    if after.isdigit():
        start = max(0, len(names) - int(after))
    elif after in names:
        start = names.index(after) + 1
    else:
        raise CnnCodesError(f"--unfreeze {after!r}: give a layer name of {network.name} or a number of last layers")
    for i, layer in enumerate(network.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return len(network.trainable_weights)


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

    A finished phase leaves its weights and history, so a resumed run skips it.
    """
    done, weights = checkpoints / f"{phase}.json", checkpoints / f"{phase}.weights.h5"
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if done.is_file() and weights.is_file():
        model.load_weights(weights)
        return read_json(done)
    history: list[dict[str, Any]] = []
    if epochs > 0:
        callbacks = [keras.callbacks.BackupAndRestore(str(checkpoints / f"{phase}-backup")),
                     keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=patience, restore_best_weights=True),
                     RichProgress(f"Fine-tuning ({phase})", epochs, progress)]
        fitted = model.fit(datasets["train"], validation_data=datasets["val"], epochs=epochs, shuffle=False,
                           class_weight=class_weight, callbacks=callbacks, verbose=0)  # tf.data shuffles
        history = [{"phase": phase, "epoch": int(e) + 1, **{k: float(v[i]) for k, v in fitted.history.items()}}
                   for i, e in enumerate(fitted.epoch)]
    model.save_weights(weights)
    write_json_atomic(done, history)
    return history


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
