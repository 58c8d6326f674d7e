"""Run records: the one description of a fitted model, kept beside it as `<run>.json`.

A record says how a model was made (its `origin`: the codes, split and settings it came
from), what data it saw (the split's fingerprint) and how it scored. `compare` ranks
records, `predict` checks a model file against the SHA-256 its record holds. Every method
builds, names, publishes and reads its records here, so the format lives in one place.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import (
    make_folder,
    package_versions,
    read_json,
    sha256_file,
    sync_folder,
    temporary_beside,
    write_bytes_atomic,
    write_json_atomic,
)
from cnncodes.core.progress import warn
from cnncodes.core.writes import says_where
from cnncodes.runs.evaluate import calibration
from cnncodes.runs.schema import RECORD_FORMAT, validate_record

# What a run leaves beside its record: a fit-svm bundle or a fine-tuned Keras model.
MODEL_SUFFIXES = (".joblib", ".keras")


def run_name(prefix: str | None, *parts: str) -> str:
    """`[prefix-]part-part…`: the name of a run's files, prefixed by the user's `--name`.

    The prefix must name files inside the output folder, where `compare` looks for runs.
    """
    if prefix and (prefix.startswith(".") or any(c in prefix for c in "/\\\0")):
        raise CnnCodesError(
            f"--name {prefix!r} cannot be part of a file name in the output folder: use no '/', '\\' or leading '.'"
        )
    return "-".join([prefix, *parts] if prefix else parts)


def sidecar(model_path: Path) -> Path:
    """Where the record of a model file lives."""
    return model_path.with_suffix(".json")


def build_record(**fields: Any) -> dict[str, Any]:
    """A run record with the given fields, stamped with the package versions and the time."""
    return {
        "format": RECORD_FORMAT,
        **fields,
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def refuse_to_replace(model_path: Path, origin: dict[str, Any]) -> None:
    """Stop before a run of the same name made from other codes or settings is replaced.

    Re-running the same command replaces its run; anything else that would change what the
    run means (another extractor, split, normalisation, PCA, class weights…) needs a name.
    """
    try:
        old = read_json(sidecar(model_path))
        old_origin = old.get("origin") or {
            "features": old["dataset"].get("features"),
            "split_fingerprint": old["dataset"].get("split_fingerprint"),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    changed = sorted(k for k in set(old_origin) & set(origin) if old_origin[k] != origin[k])
    if changed:
        raise CnnCodesError(
            f"{model_path.parent} already holds run {model_path.stem}, made with another "
            f"{', '.join(changed)}: give these runs a --name, or another --out folder"
        )


def previous_model(model_path: Path) -> Path:
    """Where a publish keeps the model it replaces until the new record is in place (empty: there was none).

    Until then the record beside the model is the old one, so a reader whose model does not
    match its record finds the model that does here (`runs.bundle.load_record_for`).
    """
    return model_path.with_name(f".{model_path.stem}.previous{model_path.suffix}")


def publish_run(model_path: Path, write_model: Callable[[Path], None], record: dict[str, Any]) -> dict[str, Any]:
    """Write a model and its record together: a reader, and the next run, find the old pair or the new one.

    `write_model(tmp)` writes the model file; its size and SHA-256 go into the record. Both are
    written to temporary names; then the old model moves aside (`previous_model`), the new one
    takes its name, and the record comes last. A run killed before that last rename leaves the
    old record with the old model aside, which readers use and the next publish puts back
    (`settle_run`). The caller holds the lock of the run's folder or name.

    Args:
        model_path: where the model goes; its record goes beside it (`sidecar`).
        write_model: writes the model to the path it is given.
        record: the record's fields (`build_record`), checked before anything moves.

    Returns:
        The record as published, with the model's file name, size and SHA-256.
    """
    make_folder(model_path.parent)
    settle_run(model_path)
    with temporary_beside(model_path) as model_tmp, temporary_beside(sidecar(model_path)) as record_tmp:
        with says_where(model_path, model_tmp):
            write_model(model_tmp)
        record = {
            **record,
            "model_file": model_path.name,
            "model_bytes": model_tmp.stat().st_size,
            "model_sha256": sha256_file(model_tmp),
        }
        record = validate_record(record, sidecar(model_path))
        with says_where(sidecar(model_path), record_tmp):
            write_json_atomic(record_tmp, record)
        previous = previous_model(model_path)
        if model_path.exists():
            os.replace(model_path, previous)
        else:
            write_bytes_atomic(previous, b"")
        with says_where(model_path, model_tmp):
            os.replace(model_tmp, model_path)
        with says_where(sidecar(model_path), record_tmp):
            os.replace(record_tmp, sidecar(model_path))
        sync_folder(model_path.parent)
        previous.unlink()
    return record


def settle_run(model_path: Path) -> None:
    """Finish or undo what a publish killed between its renames left, so the run is one pair again.

    Its record in place and matching the model, the publish was complete: the model it replaced
    goes. Otherwise the record is the old one: the old model comes back, or, when there was none,
    the killed run's model goes. Call it with the lock `publish_run`'s caller holds.

    Args:
        model_path: the run's model file.
    """
    previous = previous_model(model_path)
    if not previous.is_file():
        return
    complete = _matches_record(model_path)
    if not complete and previous.stat().st_size:
        os.replace(previous, model_path)
    else:
        if not complete:
            model_path.unlink(missing_ok=True)
        previous.unlink()
    sync_folder(model_path.parent)


def _matches_record(model_path: Path) -> bool:
    """Whether the model file is the one the record beside it describes."""
    try:
        return model_path.is_file() and read_json(sidecar(model_path))["model_sha256"] == sha256_file(model_path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_through_temporary(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes a file beside `path` that then replaces it: a kill leaves the old file or the new one."""
    with temporary_beside(path) as tmp, says_where(path, tmp):
        write(tmp)
        os.replace(tmp, path)


def load_records(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """Every run record in the folders (files that are not run records are passed over).

    A folder given twice is read once; runs of the same name in two folders are told apart
    by their folder as given (`exp2/models/vgg16-block5_pool-knn`), as every table keys runs by name,
    and copies of a run in one folder by their record's file name (`exp2/models/copy`).
    """
    as_given: dict[Path, Path] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise CnnCodesError(f"{folder} is not a folder of models: give the --out folder of fit-svm or finetune")
        as_given.setdefault(folder.resolve(), folder)
    records = []
    for folder in as_given.values():
        for path in sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")):  # not temporaries
            record = _run_record(path)
            if record is not None:
                records.append(record | {"record_path": str(path)})
    if not records:
        raise CnnCodesError(
            f"no run records in {', '.join(map(str, folders))}: fit models first with `cnncodes fit-svm`"
        )
    names = Counter(r["run"] for r in records)
    labels = [f"{Path(r['record_path']).parent}/{r['run']}" if names[r["run"]] > 1 else r["run"] for r in records]
    twice = Counter(labels)
    labels = [str(Path(r["record_path"]).with_suffix("")) if twice[x] > 1 else x for r, x in zip(records, labels)]
    return [r | {"run": label} for r, label in zip(records, labels)]


def _run_record(path: Path) -> dict[str, Any] | None:
    """The run record at `path`; None for other JSON files. A damaged one is passed over with a warning.

    A record is damaged when `RunRecord` refuses it, or, beside its model, it cannot be read.
    """
    beside_a_model = any(path.with_suffix(suffix).is_file() for suffix in MODEL_SUFFIXES)
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:
        if beside_a_model:
            warn(f"skipped {path}: the run record of the model beside it cannot be read ({first_line(e)})")
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        if beside_a_model:
            warn(f"skipped {path}: the model beside it has no cnncodes run record ({RECORD_FORMAT}) here")
        return None
    try:
        return validate_record(record, path)
    except CnnCodesError as e:
        warn(f"skipped {e} (damaged, edited by hand, or made by another version)")
        return None


# The calibration scores kept per split; `compare` shows the means of the first two.
_REPEATED_TRUST = ("ece", "confidence_auroc", "confidence_right", "confidence_wrong")


def repeat_score(seed: int, y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """One split of `--repeats`: its seed, test accuracy and size, and how far its probabilities can be trusted."""
    trust = calibration(y_true, proba)
    return {
        "seed": seed,
        "accuracy": float((proba.argmax(axis=1) == y_true).mean()),
        "n_test": len(y_true),
        **{key: trust[key] for key in _REPEATED_TRUST},
    }


def repeats_summary(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The record fields of a run scored on several splits: each split's scores, their means, accuracy's sd.

    One split's ECE or AUROC rests on its few wrong predictions as much as its accuracy does.
    A mean skips the splits whose score is None (an AUROC needs a right and a wrong prediction),
    and is None when a split lacks the score: a fine-tune resumed with splits scored by an older
    version would otherwise pass off the newer splits' mean as all of theirs.
    """
    accuracies = [r["accuracy"] for r in repeats]
    means = {}
    for key in _REPEATED_TRUST:
        found = [r[key] for r in repeats if r.get(key) is not None]
        complete = found and all(key in r for r in repeats)
        means[f"{key}_mean"] = float(np.mean(found)) if complete else None
    return {
        "repeats": repeats,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_sd": float(np.std(accuracies, ddof=1)),
        **means,
    }
