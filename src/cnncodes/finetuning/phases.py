"""The training loop of a fine-tune: its phases in order, each a `fit` that an interruption cannot undo.

A finished phase leaves its weights and history in the run's checkpoint folder, so a
resumed run skips it; a phase interrupted mid-way goes on from its last epoch's backup with
its history and early-stopping state.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnncodes.core.files import read_json, write_json_atomic
from cnncodes.finetuning.callbacks import (
    CheckedBackup,
    HistoryLog,
    InterruptGuard,
    ResumableEarlyStopping,
    RichProgress,
)
from cnncodes.finetuning.spec import Phase, TrainingSpec
from cnncodes.finetuning.surgery import set_trainable
from cnncodes.runs.records import write_through_temporary

# Training steps (epochs x batches) up to which a phase runs eagerly: tracing its train, validation and
# predict functions costs seconds, more than so few steps gain from graphs (eager took 0.74x at 3 steps,
# 0.91x at 6, 1.12x at 9: scripts/bench_eager.py, docs/benchmarks.md). A resumed phase counts all its steps.
EAGER_STEPS = 6


@dataclass(kw_only=True)
class Training:
    """The models and data of one run: `model` is saved, `trained` is what `fit` trains.

    `trained` is the model itself, or, with `--cache-trunk`, its top on the cached trunk
    activations: the same layer objects, so training it trains `model`.
    """

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


def train_phases(
    spec: TrainingSpec, training: Training, checkpoints: Path, callbacks: Sequence[Any], progress: bool
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every phase of `spec` in order, each skipped when finished and resumed when interrupted.

    Args:
        spec: the phases, patience and seed.
        training: the models and batches of the run.
        checkpoints: the run's checkpoint folder.
        callbacks: extra Keras callbacks for every phase's `fit`.
        progress: rich progress bars.

    Returns:
        The per-epoch history, and the count of trainable weights of each phase.
    """
    keras.utils.set_random_seed(spec.seed)  # building a trunk extractor may have drawn numbers: same run, same draws
    history: list[dict[str, Any]] = []
    trainable = {}
    n_train = int(np.sum(training.subsets == "train"))
    for phase in spec.phases():
        if training.network is not None:
            set_trainable(training.network, training.first_unfrozen if phase.unfreeze else None)
        trainable[phase.name] = len(training.trained.trainable_weights)
        eager = phase.epochs * math.ceil(n_train / spec.batch_size) <= EAGER_STEPS
        history += _phase(training, phase, spec.patience, checkpoints, callbacks, progress, eager=eager)
    return history, trainable


def _phase(
    training: Training,
    phase: Phase,
    patience: int,
    checkpoints: Path,
    callbacks: Sequence[Any],
    progress: bool,
    *,
    eager: bool,
) -> list[dict[str, Any]]:
    """One phase: Adam at its rate, early stopping on val accuracy (best weights kept), a backup per epoch.

    A finished phase leaves its weights and history, so a resumed run skips it; a phase
    interrupted mid-way resumes from its last backup with its history and early-stopping state.
    A phase of few steps runs `eager`ly: tracing its functions into graphs would cost more.
    """
    model = training.trained
    done, weights = checkpoints / f"{phase.name}.json", checkpoints / f"{phase.name}.weights.h5"
    if done.is_file() and weights.is_file():
        model.load_weights(weights)
        return read_json(done)
    model.compile(
        optimizer=keras.optimizers.Adam(phase.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=eager,
    )
    log = HistoryLog(checkpoints / f"{phase.name}-history.json", phase.name)
    if phase.epochs > 0:
        _fit(training, phase, patience, checkpoints, log, callbacks, progress)
    write_through_temporary(weights, model.save_weights)
    write_json_atomic(done, log.epochs)
    shutil.rmtree(checkpoints / f"{phase.name}-backup", ignore_errors=True)  # last: until here, --resume needs it
    return log.epochs


def _fit(
    training: Training,
    phase: Phase,
    patience: int,
    checkpoints: Path,
    log: HistoryLog,
    callbacks: Sequence[Any],
    progress: bool,
) -> None:
    """`fit` the phase from its last backup, if any, with the checkpoint writers held together against signals."""
    backup = CheckedBackup(checkpoints / f"{phase.name}-backup")
    initial_epoch = backup.restore(training.trained)
    guard = InterruptGuard()
    every = [
        guard.hold,
        log,
        backup,
        ResumableEarlyStopping(checkpoints / f"{phase.name}-stopping", patience),
        guard.release,
        RichProgress(f"Fine-tuning ({phase.name})", phase.epochs, progress),
        *callbacks,
    ]
    with guard:
        training.trained.fit(
            training.datasets["train"],
            validation_data=training.datasets["val"],
            epochs=phase.epochs,
            initial_epoch=initial_epoch,
            shuffle=False,  # the datasets shuffle themselves
            class_weight=training.class_weight,
            callbacks=every,
            verbose=0,
        )
