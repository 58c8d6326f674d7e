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

import io
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import keras
import numpy as np

from cnncodes.codes.extract import META_FILE, REJECTED_FILE, SPLIT_FILE, extract, plan, skipped_summary
from cnncodes.codes.features import load_features
from cnncodes.core.choices import SMALL_CNN
from cnncodes.core.errors import CnnCodesError, check_types, first_line
from cnncodes.core.files import exclusive, make_folder, read_json, sha256_json, write_bytes_atomic, write_json_atomic
from cnncodes.core.progress import progress_bar, warn
from cnncodes.data.ingest import BadImage, check_resize, discover, load_square
from cnncodes.data.split import (
    DEFAULT_DUP_THRESHOLD,
    DEFAULT_FRACTIONS,
    SUBSETS,
    Split,
    label_indices,
    parse_fractions,
    read_split_csv,
)
from cnncodes.nets.backbones import DEFAULT_BACKBONE, Backbone, get_backbone
from cnncodes.nets.models import build_classifier, small_cnn
from cnncodes.nets.weights import Weights
from cnncodes.runs.evaluate import per_image_predictions, score
from cnncodes.runs.records import (
    build_record,
    publish,
    refuse_to_replace,
    repeat_score,
    repeats_summary,
    run_name,
    write_through_temporary,
)

CHECKPOINTS = ".finetune"
# --cache-trunk keeps the activations at the cut point here, so the next run with the same cut reuses them.
TRUNK_DIR = ".trunk"
SMALL_CNN_SIZE = 64
SMALL_CNN_MIN_SIZE = 8  # two 3x3 convolutions and a 2x2 pooling leave at least 2x2


class Phase(NamedTuple):
    """One `model.fit`: its name, whether the backbone's top block trains, epochs and learning rate."""

    name: str
    unfreeze: bool
    epochs: int
    lr: float


@dataclass(frozen=True)
class FinetuneSpec:
    """An ImageNet backbone and a new head, trained in two phases; every field is a setting.

    The checkpoint key and the run record's `params` derive from the fields, so no setting
    can be left out of either. `unfreeze` is a layer name or a count of last layers.
    """

    backbone: str
    weights: Weights
    image_size: int
    resize: str
    unfreeze: str | int
    batch_size: int
    head_epochs: int
    fine_epochs: int
    head_lr: float
    lr: float
    dropout: float
    augment: bool
    cache_trunk: bool
    class_weight: str | None
    patience: int
    seed: int

    method = "finetune"

    @property
    def entry(self) -> Backbone:
        return get_backbone(self.backbone)

    @property
    def run_stem(self) -> str:
        return f"{self.backbone}-finetune"

    @property
    def described(self) -> dict[str, str]:
        unfrozen = f"last {self.unfreeze} layers" if isinstance(self.unfreeze, int) else f"after {self.unfreeze}"
        return {"layer": unfrozen, "classifier": "dense head"}

    def build(self, n_classes: int) -> tuple[keras.Model, keras.Model | None]:
        return build_classifier(self.entry, self.image_size, n_classes, self.weights, self.dropout)

    def phases(self) -> list[Phase]:
        return [Phase("head", False, self.head_epochs, self.head_lr), Phase("fine", True, self.fine_epochs, self.lr)]


@dataclass(frozen=True)
class ScratchSpec:
    """The small ConvNet trained from scratch, all its layers in one phase: the baseline for transfer learning."""

    image_size: int
    resize: str
    batch_size: int
    epochs: int
    lr: float
    augment: bool
    class_weight: str | None
    patience: int
    seed: int

    backbone = SMALL_CNN
    method = "from-scratch"
    weights = Weights("none")
    cache_trunk = False
    run_stem = f"{SMALL_CNN}-scratch"
    described: ClassVar[dict[str, str]] = {"layer": "all layers", "classifier": "small ConvNet"}

    def build(self, n_classes: int) -> tuple[keras.Model, keras.Model | None]:
        return small_cnn(self.image_size, n_classes), None

    def phases(self) -> list[Phase]:
        return [Phase("scratch", True, self.epochs, self.lr)]


TrainingSpec = FinetuneSpec | ScratchSpec


def make_spec(
    backbone: str = DEFAULT_BACKBONE,
    *,
    weights: str = "imagenet",
    image_size: int | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    head_epochs: int = 5,
    fine_epochs: int = 5,
    unfreeze: str | int | None = None,
    head_lr: float = 1e-3,
    lr: float = 1e-5,
    dropout: float = 0.2,
    augment: bool | None = None,
    cache_trunk: bool = False,
    class_weight: str | None = None,
    patience: int = 3,
    seed: int = 0,
) -> TrainingSpec:
    """Check the settings of a fine-tune before any image is read, and resolve its weights.

    Args:
        backbone: a registry name, or `smallcnn` for the small ConvNet trained from scratch
            (`head_epochs + fine_epochs` epochs at `head_lr`; needs `weights="none"`).
        weights: `imagenet`, `none` or the path of a Keras weights file.
        image_size: square input size (default: the backbone's; 64 for smallcnn).
        resize: `crop`, `squash` or `pad`, as in `extract`.
        batch_size: images per training step.
        head_epochs, fine_epochs: epochs of phase 1 (the head) and phase 2 (the top block too).
        unfreeze: phase 2 trains the layers after this one, or this many last layers
            (default: the registry's last block).
        head_lr, lr: Adam learning rates of the two phases.
        dropout: before the new softmax layer.
        augment: random flips, rotations, zooms and contrast (default: on, off with `cache_trunk`).
        cache_trunk: compute the frozen layers' activations once and train only above them.
        class_weight: `balanced` for imbalanced classes.
        patience: epochs without a better val accuracy before a phase stops.
        seed: shuffling and initialisation.
    """
    if min(head_epochs, fine_epochs) < 0 or head_epochs + fine_epochs == 0:
        raise CnnCodesError(
            f"--head-epochs and --fine-epochs take 0 or more epochs, at least one in all (got {head_epochs} and "
            f"{fine_epochs})"
        )
    if batch_size < 1 or not all(0 < rate < math.inf for rate in (head_lr, lr)):  # NaN compares false
        raise CnnCodesError(
            f"--batch-size must be at least 1 and learning rates positive numbers "
            f"(got {batch_size}, --head-lr {head_lr}, --lr {lr})"
        )
    check_resize(resize)
    if class_weight not in (None, "balanced"):
        raise CnnCodesError(f"class_weight takes 'balanced' or None (got {class_weight!r})")
    if not 0 <= dropout < 1 or patience < 1:
        raise CnnCodesError(f"--dropout takes 0 to 0.99 and --patience 1 or more (got {dropout} and {patience})")
    check_types(unfreeze=(unfreeze, (str, int, type(None))))
    augment = not cache_trunk if augment is None else augment
    if cache_trunk and augment:
        raise CnnCodesError(
            "--cache-trunk trains on activations computed once, so it cannot augment: "
            "drop --augment, or drop --cache-trunk"
        )
    if backbone.lower() == SMALL_CNN:
        if weights != "none":
            raise CnnCodesError(f"{SMALL_CNN} trains from scratch and has no pretrained weights: pass --weights none")
        if unfreeze or cache_trunk:
            raise CnnCodesError(
                f"{SMALL_CNN} trains all its layers from scratch: "
                "--unfreeze and --cache-trunk apply to ImageNet backbones only"
            )
        size = image_size or SMALL_CNN_SIZE
        if size < SMALL_CNN_MIN_SIZE:
            raise CnnCodesError(
                f"{SMALL_CNN} needs images of at least {SMALL_CNN_MIN_SIZE} px (got --image-size {size})"
            )
        return ScratchSpec(
            size, resize, batch_size, head_epochs + fine_epochs, head_lr, augment, class_weight, patience, seed
        )
    entry = get_backbone(backbone)
    size = image_size or entry.default_size
    entry.check_size(size, entry.default_layer)
    return FinetuneSpec(
        entry.name,
        entry.resolve_weights(weights, entry.default_layer),
        size,
        resize,
        parse_unfreeze(entry.finetune_after if unfreeze is None else str(unfreeze)),
        batch_size,
        head_epochs,
        fine_epochs,
        head_lr,
        lr,
        dropout,
        augment,
        cache_trunk,
        class_weight,
        patience,
        seed,
    )


def parse_unfreeze(text: str) -> str | int:
    """`--unfreeze` as a layer name or a positive count of last layers."""
    if not text.isdigit():
        return text
    if int(text) == 0:
        raise CnnCodesError("--unfreeze 0 unfreezes nothing: to train the head only, use --fine-epochs 0")
    return int(text)


def spec_params(spec: TrainingSpec) -> dict[str, Any]:
    """The settings of a spec as the run record lists them (weights are in its `extractor`)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("backbone", "weights")}


def finetune(
    data: Path | str,
    out: Path | str,
    spec: TrainingSpec | None = None,
    *,
    split_from: Path | str | None = None,
    split: str | Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    name: str | None = None,
    repeats: int = 1,
    resume: bool = False,
    restart: bool = False,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train `spec` on the train subset, stop each phase early on val, score once on test.

    Writes `<run>.keras` (raw RGB pixels in) and `<run>.json` (the run record) into `out`,
    together, and returns the record.

    Args:
        data: a class-per-folder directory or a `path,label` CSV.
        out: the models folder.
        spec: what to train (`make_spec(...)`; default: `make_spec()`, MobileNetV2).
        split_from: a features folder or `split.csv` whose split to use, so the run is scored
            on the same test images as the CNN codes; else the split is made as `extract`
            makes it from `split`, `split_seed` and `dup_threshold`.
        name: prefix of the run name.
        repeats: also train on `repeats - 1` more splits of the same images (the duplicate-aware
            rule of `extract`, seeds counting up from the features' own; needs `split_from` a
            features folder) and record each split's test accuracy and calibration scores, their
            means and accuracy's sd. The saved model is the first split's. Practical with `cache_trunk`.
        resume: go on from the last finished epoch of an interrupted run (same settings).
        restart: discard an interrupted run's checkpoints and start afresh.
        callbacks: extra Keras callbacks for every phase's `fit`.
        progress: rich progress bars.
    """
    if resume and restart:
        raise CnnCodesError("--resume goes on from an interrupted run and --restart discards it: give one of them")
    spec = spec or make_spec()
    run = run_name(name, spec.run_stem)
    data, out = Path(data), Path(out)
    fractions = parse_fractions(split)
    make_folder(out)
    splits = _splits(
        data, out, Path(split_from) if split_from else None, fractions, split_seed, dup_threshold, repeats, progress
    )
    (first_seed, the_split), others = splits[0], splits[1:]
    origin = {
        "split": the_split.fingerprint,
        "setting": sha256_json([type(spec).__name__, spec_params(spec), spec.weights.sha256, repeats]),
    }
    model_path = out / f"{run}.keras"
    refuse_to_replace(model_path, origin)
    if split_from is None:  # the split made here, for `--split-from OUT` and the record's readers
        the_split.write_csv(out / SPLIT_FILE)
    key = sha256_json(origin)
    with _running(out, run) as checkpoints:
        fresh = _fresh_checkpoints(checkpoints, key, resume, restart)
        try:
            training = _prepare(spec, data, out, the_split, progress)  # checks the arguments a model needs
        except KeyboardInterrupt as e:  # before any epoch: say so, for the CLI's last line
            if fresh:
                kept = " (cached trunk activations are kept)" if spec.cache_trunk else ""
                e.add_note(f"no epoch had started; run the same command again{kept}.")
            raise
        if fresh:
            shutil.rmtree(checkpoints, ignore_errors=True)
            checkpoints.mkdir(parents=True)
            write_json_atomic(checkpoints / "arguments.json", {"key": key})
        history, trainable, proba = _train_and_predict(spec, training, checkpoints, callbacks, progress)
        record = _record(spec, run, origin, data, the_split, training, history, trainable, proba)
        if others:
            scores = [repeat_score(first_seed, training.labels[training.subsets == "test"], proba)]
            scores += [_score_repeat(spec, data, out, seed, split, checkpoints, progress) for seed, split in others]
            record |= repeats_summary(scores)
        record = publish(model_path, lambda tmp: _for_inference(training.model).save(tmp), record)
        shutil.rmtree(checkpoints, ignore_errors=True)  # last: a crash before here can still --resume
    return record


def _for_inference(model):
    """The trained model without its optimizer, whose state (Adam's two slots per trained weight) would
    double or triple the file and make sizes depend on how it was trained, and which predict never uses."""
    return keras.Model(model.inputs, model.outputs, name=model.name)


@contextmanager
def _running(out: Path, run: str) -> Iterator[Path]:
    """The run's checkpoint folder, used by no other process meanwhile (two would write the same files).

    The lock, and the folder of all runs' checkpoints, go once nothing is left to resume.
    """
    checkpoints = out / CHECKPOINTS / run
    lock = checkpoints.with_name(f"{run}.lock")
    busy = f"another cnncodes finetune is training {run} in {out}: wait for it to end, or give this one another --name"
    with exclusive(lock, busy):
        try:
            yield checkpoints
        finally:
            if not checkpoints.is_dir():
                lock.unlink(missing_ok=True)
                with suppress(OSError):
                    checkpoints.parent.rmdir()


def _splits(
    data: Path,
    out: Path,
    split_from: Path | None,
    fractions: Sequence[float],
    seed: int,
    dup_threshold: int,
    repeats: int,
    progress: bool,
) -> list[tuple[int, Split]]:
    """The split to train on, with its seed, then the other splits of `repeats`."""
    if repeats < 1:
        raise CnnCodesError(f"--repeats must be at least 1 (got {repeats})")
    if repeats == 1:
        return [(seed, load_split(data, out, split_from, fractions, seed, dup_threshold, progress))]
    if split_from is None or not split_from.is_dir():
        raise CnnCodesError(
            "--repeats splits the images of a features folder again, keeping its duplicate groups "
            "together: give --split-from the folder extract wrote"
        )
    load_split(data, out, split_from, fractions, seed, dup_threshold, progress)  # the images must all be there
    feats = load_features(split_from)
    labels = [feats.classes[i] for i in feats.y]
    return [(s, Split(feats.paths, labels, list(subsets))) for s, subsets in feats.repeated_splits(repeats)]


def _score_repeat(
    spec: TrainingSpec, data: Path, out: Path, seed: int, the_split: Split, checkpoints: Path, progress: bool
) -> dict[str, Any]:
    """Train afresh on another split and score on its test images; a finished repeat is kept for --resume."""
    done = checkpoints / f"repeat-{seed}.json"
    if done.is_file():
        return read_json(done)
    folder = checkpoints / f"repeat-{seed}"
    folder.mkdir(exist_ok=True)
    training = _prepare(spec, data, out, the_split, progress)
    proba = _train_and_predict(spec, training, folder, (), progress)[2]
    score = repeat_score(seed, training.labels[training.subsets == "test"], proba)
    write_json_atomic(done, score)
    return score


def image_root(data: Path) -> Path:
    """The folder split paths are relative to: the dataset folder, or a CSV's folder (as `discover` has it)."""
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
    """The split of a features folder (or a split.csv) when given, else one made as `extract` makes it."""
    if split_from is None:
        if (out / META_FILE).is_file():  # its split.csv belongs to its codes
            raise CnnCodesError(
                f"{out} is a features folder: give finetune another --out, and --split-from {out} to use its split"
            )
        planned = plan(discover(data), out, fractions, seed, dup_threshold, progress=progress)
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
    csv_path = split_from / SPLIT_FILE if split_from.is_dir() else split_from
    the_split = read_split_csv(csv_path)
    root = image_root(data)
    missing = [p for p in the_split.paths if not (root / p).is_file()]
    if missing:
        raise CnnCodesError(
            f"{len(missing)} image(s) of {csv_path} are not under {data} (e.g. {missing[0]}): "
            "give the DATA folder the split was made from"
        )
    return the_split


@dataclass
class _Training:
    """The models and data of one run: `model` is saved, `trained` is what `fit` trains (the model, or its top
    on cached trunk activations: the same layer objects)."""

    model: keras.Model
    trained: keras.Model
    network: keras.Model | None
    first_unfrozen: int | None
    datasets: dict[str, Any]
    class_weight: dict[int, float] | None
    classes: list[str]
    labels: np.ndarray
    subsets: np.ndarray
    extract_seconds: float | None
    unreadable: list[str]


def _prepare(spec: TrainingSpec, data: Path, out: Path, the_split: Split, progress: bool) -> _Training:
    classes, labels, subsets = _labelled(the_split)
    keras.utils.set_random_seed(spec.seed)
    model, network = spec.build(len(classes))
    start = first_unfrozen(network, spec.unfreeze) if isinstance(spec, FinetuneSpec) and network else None
    extract_seconds: float | None = None
    unreadable: list[str] = []
    if isinstance(spec, FinetuneSpec) and spec.cache_trunk and network is not None and start is not None:
        cut = cut_layer(network, start)
        trained = cached_top(model, network, cut)
        datasets, extract_seconds = _trunk_datasets(
            data, out, spec, cut, trained.input_shape[1:], the_split, labels, subsets, progress
        )
    else:
        trained = model
        paths = [str(image_root(data) / p) for p in the_split.paths]
        datasets = {s: _dataset(paths, labels, subsets == s, spec, s == "train", unreadable) for s in SUBSETS}
    weights = _class_weights(labels[subsets == "train"], len(classes)) if spec.class_weight else None
    return _Training(
        model, trained, network, start, datasets, weights, classes, labels, subsets, extract_seconds, unreadable
    )


def _train(
    spec: TrainingSpec, training: _Training, checkpoints: Path, callbacks: Sequence[Any], progress: bool
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every phase in order; returns the per-epoch history and the trainable weights of each phase."""
    keras.utils.set_random_seed(spec.seed)  # building a trunk extractor may have drawn numbers: same run, same draws
    history: list[dict[str, Any]] = []
    trainable = {}
    for phase in spec.phases():
        if training.network is not None:
            set_trainable(training.network, training.first_unfrozen if phase.unfreeze else None)
        trainable[phase.name] = len(training.trained.trainable_weights)
        history += _phase(training, phase, spec.patience, checkpoints, callbacks, progress)
    return history, trainable


def _train_and_predict(
    spec: TrainingSpec, training: _Training, checkpoints: Path, callbacks: Sequence[Any], progress: bool
) -> tuple[list[dict[str, Any]], dict[str, int], np.ndarray]:
    """`_train`, then the test images' probabilities; an image that no longer decodes is one error line.

    Its subset cannot go without it (the test images are those of every run on the split), so
    the run stops; its finished epochs are kept for --resume once the file is restored.
    """
    import tensorflow as tf

    try:
        history, trainable = _train(spec, training, checkpoints, callbacks, progress)
        proba = training.trained.predict(training.datasets["test"], verbose=0)
    except tf.errors.OpError:
        if not training.unreadable:
            raise
        raise CnnCodesError(
            f"cannot read {training.unreadable[0]}, an image of the split: restore or replace it, then run "
            "again with --resume (the finished epochs are kept)"
        ) from None
    if not np.isfinite(proba).all():  # resuming would load the same weights: only a fresh start helps
        raise CnnCodesError(
            "training diverged: the model's outputs are not finite numbers (its loss is NaN): lower --head-lr "
            "and --lr, then run again with --restart"
        )
    return history, trainable, proba


def _record(
    spec: TrainingSpec,
    run: str,
    origin: dict[str, str],
    data: Path,
    the_split: Split,
    training: _Training,
    history: list[dict[str, Any]],
    trainable: dict[str, int],
    proba: np.ndarray,
) -> dict:
    test = training.subsets == "test"
    y_test = training.labels[test]
    return build_record(
        run=run,
        method=spec.method,
        backbone=spec.backbone,
        **spec.described,
        params=spec_params(spec) | {"trainable_weights": trainable},
        extractor={
            "backbone": spec.backbone,
            "image_size": spec.image_size,
            "resize": spec.resize,
            "weights": spec.weights.kind,
            "weights_sha256": spec.weights.sha256,
        },
        dataset={"data": str(image_root(data)), "split_fingerprint": the_split.fingerprint},
        origin=origin,
        classes=training.classes,
        n_train=int((training.subsets == "train").sum()),
        n_test=int(test.sum()),
        **score(y_test, proba, training.classes),
        # the epochs' own seconds: they survive a resume, where a wall clock would restart
        fit_seconds=round(sum(e["seconds"] for e in history), 3),
        extract_seconds=training.extract_seconds,
        epochs_run=len(history),
        history=history,
        test_predictions=per_image_predictions(
            [p for p, t in zip(the_split.paths, test) if t], y_test, proba, training.classes
        ),
    )


def _labelled(the_split: Split) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, label indices and subsets as arrays; every subset must hold images."""
    classes = sorted(set(the_split.labels))
    subsets = np.array(the_split.subsets)
    for subset in SUBSETS:
        if not (subsets == subset).any():
            raise CnnCodesError(f"the split has no {subset} images: finetune needs train, val and test")
    return classes, label_indices(the_split.labels, classes), subsets


def cached_top(model, network, cut: str):
    """The part of `model` above `cut`, taking the activations there: same layers, so training it trains `model`."""
    try:
        top = keras.Model(network.get_layer(cut).output, network.output, name=f"{network.name}_after_{cut}")
    except ValueError:  # Keras: the output is not connected to that input alone
        raise CnnCodesError(
            f"--cache-trunk cannot cut {network.name} after {cut!r}: layers above it also read earlier "
            "outputs (a residual connection); give --unfreeze the last layer of a block"
        ) from None
    codes = keras.Input(top.input_shape[1:], name="trunk_codes")
    x = top(codes, training=False)
    for name in ("head_pool", "head_dropout", "head"):
        x = model.get_layer(name)(x)
    return keras.Model(codes, x, name=f"{model.name}_on_cached_trunk")


def set_trainable(network, start: int | None) -> None:
    """Freeze the backbone, or unfreeze its layers from index `start` on; BatchNormalization stays frozen either way."""
    network.trainable = start is not None
    if start is None:
        return
    for i, layer in enumerate(network.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def cut_layer(network, start: int) -> str:
    """The last frozen layer when layers from `start` on train: where `--cache-trunk` cuts the network."""
    if start < 2:  # layer 0 is the input: nothing would be frozen, nothing to cache
        raise CnnCodesError(f"--unfreeze leaves no frozen layer of {network.name} to cache: drop --cache-trunk")
    return network.layers[start - 1].name


def first_unfrozen(network, unfreeze: str | int) -> int:
    """The index of the first layer phase 2 trains: after the named layer, or the last `unfreeze` layers."""
    names = [layer.name for layer in network.layers]
    if isinstance(unfreeze, int):
        if unfreeze > len(names):
            raise CnnCodesError(f"--unfreeze {unfreeze}: {network.name} has {len(names)} layers, give at most that")
        return len(names) - unfreeze
    if unfreeze in names[:-1]:
        return names.index(unfreeze) + 1
    if unfreeze == names[-1]:  # as --unfreeze 0 is refused
        raise CnnCodesError(
            f"--unfreeze {unfreeze} is {network.name}'s last layer: nothing after it would train; "
            "to train the head only, use --fine-epochs 0"
        )
    raise CnnCodesError(f"--unfreeze {unfreeze!r}: give a layer name of {network.name} or a number of last layers")


def augmentation(seed: int):
    """Random flips, rotations, zooms and contrast, applied in the training pipeline only.

    Kept out of the saved model, so the model exports to ONNX and predicts deterministically.
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


def _dataset(
    paths: list[str], labels: np.ndarray, rows: np.ndarray, spec: TrainingSpec, train: bool, unreadable: list[str]
):
    """A streaming tf.data pipeline: decode and resize in parallel with the same code as `extract`.

    The training subset is reshuffled every epoch and, when the spec says so, augmented. An
    image that fails to decode is noted in `unreadable` (TensorFlow's own error does not say which).
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
        layers = augmentation(spec.seed)

        def randomise(pixels, y):
            moved = layers(tf.cast(pixels, tf.float32), training=True)
            return tf.cast(tf.clip_by_value(tf.round(moved), 0, 255), tf.uint8), y

        ds = ds.map(randomise, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _trunk_datasets(
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

    Returns the datasets and the seconds the activations took to compute (when first made).
    """
    weights = spec.weights
    choice = str(weights.path) if weights.kind == "file" else weights.kind
    folder = (
        out
        / TRUNK_DIR
        / f"{spec.backbone}-{cut}-{spec.image_size}-{spec.resize}-{(weights.sha256 or 'untrained')[:12]}"
    )
    extract(
        data,
        folder,
        backbone=spec.backbone,
        layer=cut,
        pooling="flatten",
        weights=choice,
        image_size=spec.image_size,
        resize=spec.resize,
        batch_size=spec.batch_size,
        progress=progress,
    )
    codes = load_features(folder)
    root = image_root(data)  # a split made from a CSV names its files from the CSV's folder: "../images/a.png"

    def where(path: str) -> str:
        return os.path.normpath(os.path.join(root, path))

    row_of = {where(p): i for i, p in enumerate(codes.paths)}
    places = [where(p) for p in the_split.paths]
    missing = [p for p, place in zip(the_split.paths, places) if place not in row_of]
    if missing:
        raise CnnCodesError(
            f"{len(missing)} image(s) of the split could not be read for --cache-trunk "
            f"(e.g. {missing[0]}: see {folder / REJECTED_FILE})"
        )
    rows = np.array([row_of[place] for place in places])
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


def _class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(n_classes) if c not in present}


def _fresh_checkpoints(folder: Path, key: str, resume: bool, restart: bool) -> bool:
    """Whether the run starts afresh: checkpoints are kept for `resume` when their key matches, discarded on `restart`.

    Checkpoints are the work of an interrupted run, so they are never deleted silently; a
    fresh run makes its folder only once its arguments have built a model, so a bad one
    leaves no interrupted run behind.
    """
    if folder.is_dir() and not restart:
        if not resume:
            raise CnnCodesError(
                f"{folder} holds the checkpoints of an interrupted run of this name: "
                "add --resume to go on from its last finished epoch, or --restart to discard them"
            )
        try:
            if read_json(folder / "arguments.json")["key"] == key:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise CnnCodesError(
            f"--resume: the checkpoints in {folder} were made with other arguments or another split; "
            "run again with the same ones, or with --restart to discard them"
        )
    return True


def _phase(
    training: _Training, phase: Phase, patience: int, checkpoints: Path, callbacks: Sequence[Any], progress: bool
) -> list[dict[str, Any]]:
    """One phase: Adam at its rate, early stopping on val accuracy (best weights kept), a backup per epoch.

    A finished phase leaves its weights and history, so a resumed run skips it; a phase
    interrupted mid-way resumes from its last backup with its history and early-stopping state.
    """
    model, datasets = training.trained, training.datasets
    done, weights = checkpoints / f"{phase.name}.json", checkpoints / f"{phase.name}.weights.h5"
    if done.is_file() and weights.is_file():
        model.load_weights(weights)
        return read_json(done)
    model.compile(
        optimizer=keras.optimizers.Adam(phase.lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    log = HistoryLog(checkpoints / f"{phase.name}-history.json", phase.name)
    if phase.epochs > 0:
        guard = InterruptGuard()
        every = [
            guard.hold,
            log,
            CheckedBackup(str(checkpoints / f"{phase.name}-backup"), delete_checkpoint=False),
            ResumableEarlyStopping(checkpoints / f"{phase.name}-stopping", patience),
            guard.release,
            RichProgress(f"Fine-tuning ({phase.name})", phase.epochs, progress),
            *callbacks,
        ]
        with guard:
            model.fit(
                datasets["train"],
                validation_data=datasets["val"],
                epochs=phase.epochs,
                shuffle=False,
                class_weight=training.class_weight,
                callbacks=every,
                verbose=0,
            )  # the datasets shuffle themselves
        # BackupAndRestore sets the epoch it restored on the model, and Keras's `fit` starts every later fit
        # there too: the next phase of a resumed run would skip that many of its epochs.
        model._initial_epoch = None
    write_through_temporary(weights, model.save_weights)
    write_json_atomic(done, log.epochs)
    shutil.rmtree(checkpoints / f"{phase.name}-backup", ignore_errors=True)  # last: until here, --resume needs it
    return log.epochs


class CheckedBackup(keras.callbacks.BackupAndRestore):
    """Keras's per-epoch backup, written so that a kill (even SIGKILL) leaves the previous epoch's whole.

    Keras overwrites its files in place: a kill in the middle left a backup `--resume` could
    not load. Files damaged some other way are one error line.
    """

    def _save_model(self):
        weights, metadata = Path(self._weights_path), Path(self._training_metadata_path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        write_through_temporary(weights, self.model.save_weights)
        write_json_atomic(metadata, {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError) as e:
            raise CnnCodesError(
                f"the backup in {self.backup_dir} is damaged ({first_line(e)}), perhaps by a kill while it was "
                "written: run again with --restart"
            ) from None


class InterruptGuard:
    """Holds Ctrl-C and `kill` (SIGTERM) while an epoch's checkpoint files are written, then delivers them.

    Each file is written whole (`CheckedBackup`), but the backup, the early-stopping state and
    the history must also agree on the epoch. `hold` and `release` are the callbacks around the
    writers; leaving the `with` block always gives the signals their handlers back.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}
        self.hold, self.release = _AtEpochEnd(self._hold), _AtEpochEnd(self._release)

    def _hold(self) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread receives signals
            self.previous = {s: signal.signal(s, self._defer) for s in self.signals}

    def _defer(self, signum: int, _frame) -> None:
        self.pending.append(signum)

    def _release(self) -> None:
        self._restore()
        pending, self.pending = self.pending, []
        for signum in dict.fromkeys(pending):  # to the handler it would have met: Ctrl-C raises KeyboardInterrupt
            signal.raise_signal(signum)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():  # one installed outside Python reads as None
            signal.signal(signum, handler if handler is not None else _DEFAULT_HANDLERS[signum])
        self.previous = {}

    def __enter__(self) -> InterruptGuard:
        return self

    def __exit__(self, *_) -> None:
        self._restore()


_DEFAULT_HANDLERS: dict[int, Any] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class _AtEpochEnd(keras.callbacks.Callback):
    def __init__(self, action):
        super().__init__()
        self.action = action

    def on_epoch_end(self, epoch, logs=None):
        self.action()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on val accuracy whose best score, patience count and best weights survive an interruption.

    BackupAndRestore brings back the model and the epoch, not this callback's state: without
    it, a resumed phase would forget the best model it had found and could end on a worse one.
    """

    def __init__(self, stem: Path, patience: int):
        super().__init__(monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True)
        self.state_file, self.weights_file = stem.with_suffix(".json"), stem.with_suffix(".npz")

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state_file.is_file() and self.weights_file.is_file():
            state = read_json(self.state_file)
            self.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]
            with np.load(self.weights_file) as saved:
                self.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]

    def on_epoch_end(self, epoch, logs=None):
        before = self.best_weights
        super().on_epoch_end(epoch, logs)
        if self.best_weights is not before:
            buf = io.BytesIO()
            np.savez(buf, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
            write_bytes_atomic(self.weights_file, buf.getvalue())
        write_json_atomic(self.state_file, {"best": self.best, "wait": self.wait, "best_epoch": self.best_epoch})


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
        entry = {
            "phase": self.phase,
            "epoch": epoch + 1,
            **{k: float(v) for k, v in (logs or {}).items()},
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1] + [entry]
        write_json_atomic(self.path, self.epochs)


class CachedRows(keras.utils.PyDataset):
    """Batches of cached trunk activations read from the memory-mapped codes; reshuffled each epoch when seeded."""

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

    def __getitem__(self, i: int):
        take = np.sort(self.order[i * self.batch_size : (i + 1) * self.batch_size])
        return self.codes[self.rows[take]].reshape(-1, *self.shape), self.labels[take]

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.rows))


class RichProgress(keras.callbacks.Callback):
    """A rich bar per epoch: batches done, rate and ETA."""

    def __init__(self, description: str, epochs: int, enabled: bool):
        super().__init__()
        self.description, self.epochs, self.enabled = description, epochs, enabled

    def on_epoch_begin(self, epoch, logs=None):
        self._bar = progress_bar(
            f"{self.description} epoch {epoch + 1}/{self.epochs}",
            self.params.get("steps") or 0,
            unit="batch",
            enabled=self.enabled,
        )
        self._advance = self._bar.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        self._advance(1)

    def on_epoch_end(self, epoch, logs=None):
        self._bar.__exit__(None, None, None)
