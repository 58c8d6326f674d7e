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
GOOD = json.loads((SAVED / f"{RUN}.json").read_text())
# Free-form settings: their contents are each method's own, checked where they are used.
FREE_FORM = ("params", "origin")
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
                yield f"{where} = -5", _set(record, path, -5)
                yield f"{where} = NaN", _set(record, path, math.nan)
                if "maximum" in json.dumps(SCHEMA.get(key, {})) and path == (key,):
                    yield f"{where} = 1e308", _set(record, path, 1e308)
    yield "classes = one class", record | {"classes": ["circles"]}
    yield "a one-class confusion_matrix", record | {"confusion_matrix": [[5]]}
    yield "accuracy_ci95 = [0.5]", record | {"accuracy_ci95": [0.5]}
    yield "nested too deeply", "[" * 100_000


CASES = list(damaged(GOOD))


def test_the_generator_covers_every_field_and_the_good_record_passes():
    assert validate_record(GOOD, "good.json") == GOOD
    touched = {what.split(" ")[0].split(".")[0] for what, _ in CASES}
    assert set(GOOD) <= touched
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


def test_a_writer_cannot_publish_a_record_out_of_range(tmp_path):
    from cnncodes.runs.records import publish_run

    with pytest.raises(CnnCodesError, match="accuracy"):
        publish_run(tmp_path / "m.joblib", lambda tmp: tmp.write_bytes(b"model"), GOOD | {"accuracy": 1.5})
    assert not list(tmp_path.iterdir())
