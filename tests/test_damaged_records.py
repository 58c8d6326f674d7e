"""Damaged run records, made by a generator over every field: one warning in compare, one error line in predict.

The generator takes a real record and, for each field (and each field of its nested parts),
removes it, gives it a value of the wrong kind, puts it out of range or makes it NaN; a file of
100,000 `[` stands for JSON nested too deeply to parse.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cnncodes.cli.main import app
from cnncodes.core.errors import CnnCodesError, CnnCodesWarning
from cnncodes.runs.records import load_records
from cnncodes.runs.schema import RunRecord, validate_record

from .helpers import runner

SAVED = Path(__file__).parent / "data" / "before_packages" / "models"
RUN = "vgg16-block5_pool-logreg"
SAVED_RECORD = json.loads((SAVED / f"{RUN}.json").read_text())
_SPLIT = {"seed": 0, "accuracy": 0.4, "n_test": 5, "ece": 0.2, "confidence_auroc": 0.5, "confidence_right": 0.6}
# The saved record with the fields only other runs write: a fine-tune's, an extractor's, --repeats'.
GOOD = SAVED_RECORD | {
    "val_score": 0.5,
    "extractor": {"backbone": "vgg16", "layer": "block5_pool", "pooling": "avg"},
    "epochs_run": 2,
    "history": [{"phase": "head", "epoch": 1, "seconds": 1.0}],
    "repeats": [_SPLIT, _SPLIT | {"seed": 1, "accuracy": 0.6}],
    "accuracy_mean": 0.5,
    "accuracy_sd": 0.14,
    "ece_mean": 0.2,
    "confidence_auroc_mean": 0.5,
}
# Free-form settings: their contents are each method's own, checked where they are used.
FREE_FORM = ("params", "origin", "extractor", "history")
SCHEMA = RunRecord.model_json_schema()["properties"]


def _wrong_kinds(value: Any) -> list[Any]:
    if isinstance(value, bool) or value is None:
        return ["x", [1]]
    if isinstance(value, (int, float)):
        return ["x", [0.5], True]
    if isinstance(value, str):
        return [5, ["x"]]
    if isinstance(value, list):
        return ["x", 5, {}]
    return ["x", [], 5]


def _set(record: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(record))
    part = copy
    for key in path[:-1]:
        part = part[key]
    part[path[-1]] = value
    return copy


def _leaves(value: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    """Every place below a field: the field itself, then its nested parts (first item of a list)."""
    yield path, value
    if path[0] in FREE_FORM:
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, (*path, key))
    elif isinstance(value, list) and value:
        yield from _leaves(value[0], (*path, 0))


def damaged(record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(what was done, the damaged record) for every field of `record`."""
    for key in record:
        if SCHEMA.get(key) is not None and key in RunRecord.model_fields and RunRecord.model_fields[key].is_required():
            yield f"{key} missing", {k: v for k, v in record.items() if k != key}
        for path, value in _leaves(record[key], (key,)):
            where = ".".join(map(str, path))
            for wrong in _wrong_kinds(value):
                yield f"{where} = {wrong!r}", _set(record, path, wrong)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if path[-1] != "seed":  # a split's seed may be any integer
                    yield f"{where} = -5", _set(record, path, -5)
                yield f"{where} = NaN", _set(record, path, math.nan)
                if "maximum" in json.dumps(SCHEMA.get(key, {})) and path == (key,):
                    yield f"{where} = 1e308", _set(record, path, 1e308)
    yield "classes = one class", record | {"classes": ["circles"]}
    yield "a one-class confusion_matrix", record | {"confusion_matrix": [[5]]}
    yield "accuracy_ci95 = [0.5]", record | {"accuracy_ci95": [0.5]}
    yield "accuracy_mean without accuracy_sd", {k: v for k, v in record.items() if k != "accuracy_sd"}
    yield "accuracy_sd = None beside a mean", record | {"accuracy_sd": None}
    yield "nested too deeply", "[" * 100_000


CASES = list(damaged(GOOD))


def test_the_generator_covers_every_field_and_the_good_record_passes():
    assert validate_record(GOOD, "good.json") == GOOD
    touched = {what.split(" ")[0].split(".")[0] for what, _ in CASES}
    assert set(RunRecord.model_fields) <= set(GOOD) <= touched
    assert len(CASES) > 150


@pytest.mark.parametrize(("what", "record"), CASES, ids=[w for w, _ in CASES])
def test_a_damaged_record_is_refused_naming_its_file_and_field(what, record):
    with pytest.raises(CnnCodesError) as refused:
        validate_record(record, "runs/x.json")
    message = str(refused.value)
    assert message.startswith("runs/x.json: ") and "\n" not in message
    if what != "nested too deeply" and "missing" not in what and "=" in what:
        assert what.split(" = ")[0].split(".")[0] in message


def _folder_with(tmp_path: Path, record: Any) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".json", ".joblib"):
        shutil.copy(SAVED / f"{RUN}{suffix}", folder / f"{RUN}{suffix}")
    knn = SAVED / "vgg16-block5_pool-knn"
    shutil.copy(knn.with_suffix(".json"), folder / "good.json")
    text = record if isinstance(record, str) else json.dumps(record)
    (folder / f"{RUN}.json").write_text(text)
    return folder


@pytest.mark.parametrize(("what", "record"), CASES[::7] + CASES[-4:], ids=[w for w, _ in CASES[::7] + CASES[-4:]])
def test_compare_passes_over_it_with_one_warning_and_predict_refuses_it_in_one_line(what, record, tmp_path):
    folder = _folder_with(tmp_path, record)
    with pytest.warns(CnnCodesWarning) as caught:
        kept = load_records([folder])
    assert [r["run"] for r in kept] == ["vgg16-block5_pool-knn"] and len(caught) == 1
    assert RUN in str(caught[0].message)
    shown = runner.invoke(app, ["compare", str(folder), "--format", "csv"])
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert shown.stderr.count("Warning:") == 1
    image = Path(__file__).parent / "data" / "before_packages" / "images" / "circles" / "circles_00.jpg"
    predicted = runner.invoke(app, ["predict", str(folder / f"{RUN}.joblib"), str(image)])
    assert predicted.exit_code == 2 and "Traceback" not in predicted.output, predicted.output
    assert len(predicted.stderr.strip().splitlines()) == 1 and f"{RUN}.json" in predicted.stderr
    assert what != "nested too deeply" or "nested too deeply" in predicted.stderr


def _absences(record: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each field the schema may go without, left out and set to null."""
    for key, field in RunRecord.model_fields.items():
        if not field.is_required():
            yield f"{key} missing", {k: v for k, v in record.items() if k != key}
            if field.default is None:
                yield f"{key} = None", record | {key: None}


def test_compare_shows_every_record_the_schema_accepts_in_each_format(tmp_path):
    optional = [key for key, field in RunRecord.model_fields.items() if not field.is_required()]
    fewest = {k: v for k, v in GOOD.items() if k not in optional}
    nulls = GOOD | {k: None for k in optional if RunRecord.model_fields[k].default is None}
    records = [record for _, record in _absences(GOOD)] + [fewest, nulls]
    folder = tmp_path / "models"
    folder.mkdir()
    for i, record in enumerate(records):
        if (record.get("accuracy_mean") is None) != (record.get("accuracy_sd") is None):  # one alone is damage
            record = {k: v for k, v in record.items() if k not in ("accuracy_mean", "accuracy_sd")}
        (folder / f"r{i}.json").write_text(json.dumps(validate_record(record, "r.json") | {"run": f"r{i}"}))
    for options in (["--format", "csv"], ["--format", "markdown"], []):
        shown = runner.invoke(app, ["compare", str(folder), *options], env={"COLUMNS": "200"})
        assert shown.exit_code == 0 and "Traceback" not in shown.output, (options, shown.output)
        assert "Warning" not in shown.stderr, shown.stderr
    listed = json.loads(runner.invoke(app, ["compare", str(folder), "--format", "json"]).stdout)
    assert len(listed) == len(records) > 40
    for i in range(len(records) - 2):
        (folder / f"r{i}.json").unlink()  # the page for the two records without any optional field
    shown = runner.invoke(app, ["compare", str(folder), "--html", str(tmp_path / "report.html")])
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert f"r{len(records) - 1}" in (tmp_path / "report.html").read_text()


def test_compare_html_passes_over_damaged_tables_and_notes_nested_too_deeply(tmp_path):
    folder = _folder_with(tmp_path, GOOD | {"per_class": []})
    for name, record in {
        "one-class": GOOD | {"confusion_matrix": [[5]]},
        "text": GOOD | {"confusion_matrix": "x"},
    }.items():
        (folder / f"{name}.json").write_text(json.dumps(record | {"run": name}))
    (folder / "notes.json").write_text("[" * 100_000)
    shown = runner.invoke(app, ["compare", str(folder), "--html", str(tmp_path / "report.html")])
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert shown.stderr.count("Warning: skipped") == 3 and "notes.json" not in shown.stderr
    assert "vgg16-block5_pool-knn" in (tmp_path / "report.html").read_text()


def test_a_writer_cannot_publish_a_record_out_of_range(tmp_path):
    from cnncodes.runs.records import publish_run

    with pytest.raises(CnnCodesError, match="accuracy"):
        publish_run(tmp_path / "m.joblib", lambda tmp: tmp.write_bytes(b"model"), GOOD | {"accuracy": 1.5})
    assert not list(tmp_path.iterdir())
