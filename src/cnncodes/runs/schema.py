"""The run record's one typed definition: what every writer must produce and every reader may rely on.

A record (`<run>.json`) is written by `fit_classifiers` and `finetune` and read by `compare`,
`predict`, `serve` and the checks before a run is replaced. All of them go through
`RunRecord`, so a damaged or hand-edited record is refused in one place, with the file and
the field named, instead of failing somewhere downstream with a traceback. Numbers are
finite and in range (accuracies in [0, 1]); fields this version does not know are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StrictInt, model_validator

from cnncodes.core.typed import Count, Name, NonNegative, Strict, Unit, validated

RECORD_FORMAT = "cnncodes.run/1"


class ClassScores(Strict):
    """One class's precision, recall and F1 on the test images, and how many it had."""

    precision: Unit
    recall: Unit
    f1: Unit
    support: Count


class TestPrediction(Strict):
    """What the run answered for one test image (paths relative to the dataset)."""

    path: Name
    label: Name
    predicted: Name
    probability: Unit | None = None


class RepeatScore(Strict):
    """One split of `--repeats`: its seed, test accuracy and calibration scores."""

    seed: StrictInt
    accuracy: Unit
    n_test: Count | None = None
    ece: Unit | None = None
    confidence_auroc: Unit | None = None
    confidence_right: Unit | None = None
    confidence_wrong: Unit | None = None


class Dataset(Strict):
    """Where the images were and which split of them the run saw."""

    data: str
    split_fingerprint: str | None = None
    features: str | None = None


class RunRecord(Strict):
    """How a model was made, what it saw and how it scored on the held-out test images."""

    format: str
    run: Name
    method: Name
    backbone: Name
    layer: str | None = None
    classifier: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    cv_score: Unit | None = None
    grid_edges: list[str] | None = None
    val_score: Unit | None = None
    origin: dict[str, Any] = Field(default_factory=dict)
    extractor: dict[str, Any] | None = None
    dataset: Dataset
    classes: Annotated[list[Name], Field(min_length=2)]
    n_train: Count | None = None
    n_test: Annotated[StrictInt, Field(ge=1)]
    accuracy: Unit
    accuracy_ci95: Annotated[list[Unit], Field(min_length=2, max_length=2)]
    balanced_accuracy: Unit
    macro_f1: Unit | None = None
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[Count]]
    log_loss: NonNegative | None = None
    brier: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    ece: Unit | None = None
    confidence_auroc: Unit | None = None
    confidence_right: Unit | None = None
    confidence_wrong: Unit | None = None
    fit_seconds: NonNegative
    extract_seconds: NonNegative | None = None
    epochs_run: Count | None = None
    history: list[dict[str, Any]] | None = None
    test_predictions: list[TestPrediction]
    repeats: list[RepeatScore] | None = None
    accuracy_mean: Unit | None = None
    accuracy_sd: NonNegative | None = None
    ece_mean: Unit | None = None
    confidence_auroc_mean: Unit | None = None
    versions: dict[str, str]
    created: str | None = None
    model_file: Name | None = None
    model_bytes: Count | None = None
    model_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RunRecord:
        if self.format != RECORD_FORMAT:
            raise ValueError(f"format is {self.format!r}, this version reads {RECORD_FORMAT}")
        n = len(self.classes)
        if len(self.confusion_matrix) != n or any(len(row) != n for row in self.confusion_matrix):
            raise ValueError(f"confusion_matrix is not {n} × {n}, one row and column per class")
        if sum(map(sum, self.confusion_matrix)) != self.n_test or len(self.test_predictions) != self.n_test:
            raise ValueError(f"confusion_matrix and test_predictions do not both count n_test = {self.n_test} images")
        if set(self.per_class) != set(self.classes):
            raise ValueError("per_class does not name the record's classes")
        if (self.accuracy_mean is None) != (self.accuracy_sd is None):
            raise ValueError("accuracy_mean and accuracy_sd go together: both over the repeated splits, or neither")
        low, high = self.accuracy_ci95
        if low > high:
            raise ValueError("accuracy_ci95 is not an interval (low > high)")
        return self


def validate_record(record: Any, path: Path | str) -> dict[str, Any]:
    """The record checked against `RunRecord`, as the plain dict it was (nothing added).

    Args:
        record: what a record file holds (or a record about to be written).
        path: the file, named in the error.

    Returns:
        The same fields, their values checked.

    Raises:
        CnnCodesError: one line naming the file and the first field that is missing, of the wrong kind or out of
            range (or that the JSON is nested too deeply to be a run record).
    """
    validated(RunRecord, record, path, what="run record")
    return record
