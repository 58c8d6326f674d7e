"""`finetune`: the end-to-end Keras path, scored on the same test set as the CNN codes.

Two phases, as the Keras transfer-learning guide recommends: first a new head on the frozen
backbone, then the last convolutional block unfrozen at a low learning rate, with
BatchNormalization kept in inference mode. The saved `.keras` model takes raw RGB pixels,
so `predict` needs nothing but the file and its run record.

On a CPU most of an epoch recomputes the frozen lower layers: `cache_trunk` computes their
activations once with `extract` itself and trains the same layer objects above the cut on
them. `smallcnn` is the from-scratch baseline transfer learning is measured against. Every
finished epoch is kept under OUT/.finetune until the run is published, so an interrupted run
resumes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnncodes.codes.features import load_features
from cnncodes.codes.layout import SPLIT_FILE
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import exclusive, make_folder, read_json, sha256_json, write_json_atomic
from cnncodes.data.split import DEFAULT_DUP_THRESHOLD, DEFAULT_FRACTIONS, SUBSETS, Split, parse_fractions
from cnncodes.finetuning.data import class_weights, image_dataset, image_root, labelled, load_split, trunk_datasets
from cnncodes.finetuning.phases import Training, train_phases
from cnncodes.finetuning.spec import FinetuneSpec, TrainingSpec, make_spec, spec_params
from cnncodes.finetuning.surgery import cached_top, cut_layer, first_unfrozen, for_inference
from cnncodes.runs.evaluate import per_image_predictions, score
from cnncodes.runs.records import build_record, publish_run, refuse_to_replace, repeat_score, repeats_summary, run_name

CHECKPOINTS = ".finetune"


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
        split: train,val,test fractions of the split made without `split_from`.
        split_seed: its seed.
        dup_threshold: its duplicate threshold.
        name: prefix of the run name.
        repeats: also train on `repeats - 1` more splits of the same images (the duplicate-aware
            rule of `extract`, seeds counting up from the features' own; needs `split_from` a
            features folder) and record each split's test accuracy and calibration scores, their
            means and accuracy's sd. The saved model is the first split's. Practical with `cache_trunk`.
        resume: go on from the last finished epoch of an interrupted run (same settings).
        restart: discard an interrupted run's checkpoints and start afresh.
        callbacks: extra Keras callbacks for every phase's `fit`.
        progress: rich progress bars.

    Returns:
        The run record, as published beside the model.

    Raises:
        CnnCodesError: bad arguments, a run that would replace another, an interrupted run
            neither resumed nor restarted, an unreadable image, or a diverged training.
    """
    if resume and restart:
        raise CnnCodesError("--resume goes on from an interrupted run and --restart discards it: give one of them")
    spec = spec or make_spec()
    run = run_name(name, spec.run_stem)
    data, out = Path(data), Path(out)
    fractions = parse_fractions(split)
    make_folder(out)
    from_path = Path(split_from) if split_from else None
    splits = _splits(data, out, from_path, fractions, split_seed, dup_threshold, repeats, progress)
    origin = {
        "split": splits[0][1].fingerprint,
        "setting": sha256_json([type(spec).__name__, spec_params(spec), spec.weights.sha256, repeats]),
    }
    model_path = out / f"{run}.keras"
    refuse_to_replace(model_path, origin)
    if split_from is None:  # the split made here, for `--split-from OUT` and the record's readers
        splits[0][1].write_csv(out / SPLIT_FILE)
    key = sha256_json(origin)
    with _running(out, run) as checkpoints:
        fresh = _fresh_checkpoints(checkpoints, key, resume, restart)
        training = _prepare_noting_interrupts(spec, data, out, splits[0][1], fresh, progress)
        if fresh:
            shutil.rmtree(checkpoints, ignore_errors=True)
            checkpoints.mkdir(parents=True)
            write_json_atomic(checkpoints / "arguments.json", {"key": key})
        record = _trained_record(spec, run, origin, data, out, splits, training, checkpoints, callbacks, progress)
        record = publish_run(model_path, lambda tmp: for_inference(training.model).save(tmp), record)
        shutil.rmtree(checkpoints, ignore_errors=True)  # last: a crash before here can still --resume
    return record


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


def prepare(spec: TrainingSpec, data: Path, out: Path, the_split: Split, progress: bool) -> Training:
    """Build the model and the batches of every subset; checks the arguments that need a model.

    Args:
        spec: what to train.
        data: the images.
        out: the models folder (where the cached trunk activations are kept).
        the_split: the split to train on.
        progress: rich progress bars.

    Returns:
        The models and data of the run.

    Raises:
        CnnCodesError: a subset without images, or an `--unfreeze` the network does not have.
    """
    classes, labels, subsets = labelled(the_split)
    keras.utils.set_random_seed(spec.seed)
    model, network = spec.build(len(classes))
    start = first_unfrozen(network, spec.unfreeze) if isinstance(spec, FinetuneSpec) and network else None
    extract_seconds: float | None = None
    unreadable: list[str] = []
    if isinstance(spec, FinetuneSpec) and spec.cache_trunk and network is not None and start is not None:
        cut = cut_layer(network, start)
        trained = cached_top(model, network, cut)
        datasets, extract_seconds = trunk_datasets(
            data, out, spec, cut, trained.input_shape[1:], the_split, labels, subsets, progress
        )
    else:
        trained = model
        paths = [str(image_root(data) / p) for p in the_split.paths]
        datasets = {s: image_dataset(paths, labels, subsets == s, spec, s == "train", unreadable) for s in SUBSETS}
    return Training(
        model=model,
        trained=trained,
        network=network,
        first_unfrozen=start,
        datasets=datasets,
        class_weight=class_weights(labels[subsets == "train"], len(classes)) if spec.class_weight else None,
        classes=classes,
        labels=labels,
        subsets=subsets,
        extract_seconds=extract_seconds,
        unreadable=unreadable,
    )


def _prepare_noting_interrupts(
    spec: TrainingSpec, data: Path, out: Path, the_split: Split, fresh: bool, progress: bool
) -> Training:
    """`prepare`; Ctrl-C meanwhile, before any epoch, says that the same command goes on (for the CLI's last line)."""
    try:
        return prepare(spec, data, out, the_split, progress)
    except KeyboardInterrupt as e:
        if fresh:
            kept = " (cached trunk activations are kept)" if spec.cache_trunk else ""
            e.add_note(f"no epoch had started; run the same command again{kept}.")
        raise


def _trained_record(
    spec: TrainingSpec,
    run: str,
    origin: dict[str, str],
    data: Path,
    out: Path,
    splits: list[tuple[int, Split]],
    training: Training,
    checkpoints: Path,
    callbacks: Sequence[Any],
    progress: bool,
) -> dict[str, Any]:
    """Train on the first split and record it; with `repeats`, train on the others too and add their scores."""
    (first_seed, the_split), others = splits[0], splits[1:]
    history, trainable, proba = _train_and_predict(spec, training, checkpoints, callbacks, progress)
    record = _record(spec, run, origin, data, the_split, training, history, trainable, proba)
    if others:
        scores = [repeat_score(first_seed, training.labels[training.subsets == "test"], proba)]
        scores += [_score_repeat(spec, data, out, seed, split, checkpoints, progress) for seed, split in others]
        record |= repeats_summary(scores)
    return record


def _score_repeat(
    spec: TrainingSpec, data: Path, out: Path, seed: int, the_split: Split, checkpoints: Path, progress: bool
) -> dict[str, Any]:
    """Train afresh on another split and score on its test images; a finished repeat is kept for --resume."""
    done = checkpoints / f"repeat-{seed}.json"
    if done.is_file():
        return read_json(done)
    folder = checkpoints / f"repeat-{seed}"
    folder.mkdir(exist_ok=True)
    training = prepare(spec, data, out, the_split, progress)
    proba = _train_and_predict(spec, training, folder, (), progress)[2]
    scored = repeat_score(seed, training.labels[training.subsets == "test"], proba)
    write_json_atomic(done, scored)
    return scored


def _train_and_predict(
    spec: TrainingSpec, training: Training, checkpoints: Path, callbacks: Sequence[Any], progress: bool
) -> tuple[list[dict[str, Any]], dict[str, int], np.ndarray]:
    """`train_phases`, then the test images' probabilities; an image that no longer decodes is one error line.

    Its subset cannot go without it (the test images are those of every run on the split), so
    the run stops; its finished epochs are kept for --resume once the file is restored.
    """
    import tensorflow as tf

    try:
        history, trainable = train_phases(spec, training, checkpoints, callbacks, progress)
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
    training: Training,
    history: list[dict[str, Any]],
    trainable: dict[str, int],
    proba: np.ndarray,
) -> dict[str, Any]:
    """The run record: settings, split, test scores and per-image predictions, and the training history.

    `val_score`, what `compare` chooses the run on, is the validation accuracy of the weights kept: each
    phase's early stopping restores its best epoch, so the last phase that trained holds them.
    """
    test = training.subsets == "test"
    y_test = training.labels[test]
    last = [e["val_accuracy"] for e in history if e["phase"] == history[-1]["phase"]] if history else []
    return build_record(
        run=run,
        method=spec.method,
        backbone=spec.backbone,
        **spec.described,
        params=spec_params(spec) | {"trainable_weights": trainable},
        val_score=max(last, default=None),
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
