"""The Keras callbacks of a fine-tuning phase: what makes an interrupted run resumable, and its progress bars.

Every epoch leaves a backup (`CheckedBackup`), the early-stopping state
(`ResumableEarlyStopping`) and the history (`HistoryLog`), each file written whole, and
`InterruptGuard` holds Ctrl-C and `kill` until all three agree on the epoch. Only Keras's
public API is used, so a new Keras cannot change how a backup is resumed unnoticed.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import read_json, write_bytes_atomic, write_json_atomic
from cnncodes.core.progress import progress_bar
from cnncodes.runs.records import write_through_temporary


class CheckedBackup(keras.callbacks.Callback):
    """A backup of the model (its optimizer's state too) at every epoch's end, to resume the phase from.

    Each file is written beside its place and then moved there, so a kill (even SIGKILL) leaves
    the previous epoch's backup whole. Keras's `BackupAndRestore` overwrites its files in place
    and resumes through a private attribute of the model; this one keeps its file names and
    layout, and `restore` gives `fit` its public `initial_epoch` instead.

    Args:
        folder: where the backup is kept; made at the first epoch's end.
    """

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder
        self.weights_file = folder / "latest.weights.h5"
        self.metadata_file = folder / "training_metadata.json"

    def restore(self, model: keras.Model) -> int:
        """Load the backup, if there is one, into `model`, which must be compiled for the phase.

        Args:
            model: the model the backup was made of.

        Returns:
            The epochs the backup had finished: `fit`'s `initial_epoch` (0 without a backup).

        Raises:
            CnnCodesError: a backup damaged, perhaps by a kill while it was written.
        """
        try:
            if self.weights_file.is_file():
                if model.optimizer is not None and not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)  # the backup holds its state: make room
                model.load_weights(self.weights_file)
            return int(read_json(self.metadata_file)["epoch"]) if self.metadata_file.is_file() else 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CnnCodesError(
                f"the backup in {self.folder} is damaged ({first_line(e)}), perhaps by a kill while it was "
                "written: run again with --restart"
            ) from None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Back up the model, then the count of finished epochs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_through_temporary(self.weights_file, self.model.save_weights)
        write_json_atomic(self.metadata_file, {"epoch": epoch + 1, "batch": 0})


class InterruptGuard:
    """Holds Ctrl-C and `kill` (SIGTERM) while an epoch's checkpoint files are written, then delivers them.

    Each file is written whole (`CheckedBackup`), but the backup, the early-stopping state and
    the history must also agree on the epoch. `hold` and `release` are the callbacks around the
    writers; leaving the `with` block always gives the signals their handlers back.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}
        self.hold, self.release = _AtEpochEnd(self._hold), _AtEpochEnd(self._release)

    def _hold(self) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread receives signals
            self.previous = {s: signal.signal(s, self._defer) for s in self.signals}

    def _defer(self, signum: int, _frame: Any) -> None:
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

    def __exit__(self, *_: object) -> None:
        self._restore()


_DEFAULT_HANDLERS: dict[int, Any] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class _AtEpochEnd(keras.callbacks.Callback):
    """Calls `action` at every epoch's end: a callback's place in the list says when."""

    def __init__(self, action: Callable[[], None]):
        super().__init__()
        self.action = action

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.action()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on val accuracy whose best score, patience count and best weights survive an interruption.

    The backup brings back the model and the epoch, not this callback's state: without it, a
    resumed phase would forget the best model it had found and could end on a worse one.

    Args:
        stem: the state's files, without suffix (`.json` and `.npz` are added).
        patience: epochs without a better val accuracy before the phase stops.
    """

    def __init__(self, stem: Path, patience: int):
        super().__init__(monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True)
        self.state_file, self.weights_file = stem.with_suffix(".json"), stem.with_suffix(".npz")

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Start as Keras does, then take up the saved state, if any."""
        super().on_train_begin(logs)
        if self.state_file.is_file() and self.weights_file.is_file():
            state = read_json(self.state_file)
            self.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]
            with np.load(self.weights_file) as saved:
                self.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Stop as Keras does, then save the state (the best weights only when they changed)."""
        before = self.best_weights
        super().on_epoch_end(epoch, logs)
        if self.best_weights is not before:
            buf = io.BytesIO()
            np.savez(buf, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
            write_bytes_atomic(self.weights_file, buf.getvalue())
        write_json_atomic(self.state_file, {"best": self.best, "wait": self.wait, "best_epoch": self.best_epoch})


class HistoryLog(keras.callbacks.Callback):
    """Every finished epoch's metrics and seconds, saved as it ends: `fit`'s own history forgets them on resume.

    It runs before the backup, so an epoch is logged before it is backed up; one re-run after
    a crash between the two replaces its log entry.

    Args:
        path: the JSON file of the phase's epochs, read back when it exists.
        phase: the phase's name, written into every entry.
    """

    def __init__(self, path: Path, phase: str):
        super().__init__()
        self.path, self.phase = path, phase
        self.epochs: list[dict[str, Any]] = read_json(path) if path.is_file() else []
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        entry = {
            "phase": self.phase,
            "epoch": epoch + 1,
            **{k: float(v) for k, v in (logs or {}).items()},
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1] + [entry]
        write_json_atomic(self.path, self.epochs)


class RichProgress(keras.callbacks.Callback):
    """A rich bar per epoch: batches done, rate and ETA.

    Args:
        description: what is trained, before "epoch i/n".
        epochs: the phase's epochs.
        enabled: False draws nothing.
    """

    def __init__(self, description: str, epochs: int, enabled: bool):
        super().__init__()
        self.description, self.epochs, self.enabled = description, epochs, enabled

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.bar = progress_bar(
            f"{self.description} epoch {epoch + 1}/{self.epochs}",
            self.params.get("steps") or 0,
            unit="batch",
            enabled=self.enabled,
        )
        self.advance = self.bar.__enter__()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.advance(1)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.bar.__exit__(None, None, None)
