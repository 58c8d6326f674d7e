"""How `predict`'s answers are written: the JSON fields `cnncodes serve` shares, CSV, and the terminal table."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from cnncodes.cli.main import app
from cnncodes.core.errors import CnnCodesError
from cnncodes.serving.answers import predictions_table, render_predictions
from cnncodes.serving.predict import Prediction

from .helpers import runner

ANSWERS = [
    Prediction("a/cat.jpg", "cat", 0.9, [{"label": "cat", "probability": 0.9}, {"label": "dog", "probability": 0.1}]),
    Prediction("b/broken.jpg", error="truncated file (image file is truncated)"),
]


def test_json_has_the_fields_of_the_server_in_input_order():
    rows = json.loads(render_predictions(ANSWERS, "json"))
    assert [list(r) for r in rows] == [["filename", "label", "probability", "top_k", "error"]] * 2
    assert rows[0]["top_k"][1] == {"label": "dog", "probability": 0.1} and rows[0]["error"] is None
    assert rows[1] == {
        "filename": "b/broken.jpg",
        "label": None,
        "probability": None,
        "top_k": [],
        "error": "truncated file (image file is truncated)",
    }


def test_csv_keeps_a_path_column_and_flattens_top_k():
    rows = list(csv.DictReader(io.StringIO(render_predictions(ANSWERS, "csv"))))
    assert rows[0] == {
        "path": "a/cat.jpg",
        "label": "cat",
        "probability": "0.900000",
        "top_k": "cat:0.900000;dog:0.100000",
        "error": "",
    }
    assert rows[1]["label"] == rows[1]["probability"] == "" and rows[1]["error"].startswith("truncated")
    with pytest.raises(CnnCodesError, match="csv or json"):
        render_predictions(ANSWERS, "xml")


def _shown(answers) -> list[str]:
    console = Console(width=200, record=True)
    console.print(predictions_table(answers))
    return console.export_text().splitlines()


def test_table_shows_labels_and_errors_each_in_its_own_column():
    lines = _shown(ANSWERS)
    header = lines[1]
    assert "error" in header and "top 2" in header
    cat, broken = next(x for x in lines if "a/cat.jpg" in x), next(x for x in lines if "broken" in x)
    assert "cat 90%, dog 10%" in cat and "0.900" in cat
    cells = [c.strip() for c in broken.split("│")[1:-1]]
    assert cells[1] == "" and cells[-1].startswith("truncated file")  # the label column holds labels only
    assert "error" not in _shown(ANSWERS[:1])[1]  # no column for errors when none happened


def test_the_header_counts_the_classes_listed_not_the_ones_asked_for():
    two = [
        Prediction("a.jpg", "cat", 0.9, [{"label": "cat", "probability": 0.9}, {"label": "dog", "probability": 0.1}])
    ]
    assert "top 2" in _shown(two)[1] and "top 3" not in _shown(two)[1]


def test_predict_through_the_cli_counts_the_classes_it_lists_and_keeps_errors_apart(tmp_path):
    saved = Path(__file__).parent / "data" / "before_packages"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a whole jpeg")
    shown = runner.invoke(
        app,
        [
            "predict",
            str(saved / "models" / "vgg16-block5_pool-logreg.joblib"),
            str(saved / "images" / "circles"),
            str(broken),
            "--top-k",
            "5",
            "--quiet",
        ],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    header = next(line for line in shown.stdout.splitlines() if "image" in line)
    assert "top 3" in header and "top 5" not in header and "error" in header  # three classes, one unreadable file
    row = next(line for line in shown.stdout.splitlines() if "broken.jpg" in line)
    assert [c.strip() for c in row.split("│")[1:-1]][1] == ""


def test_predict_names_a_record_given_for_its_model_an_empty_folder_and_a_fifo(tmp_path):
    saved = Path(__file__).parent / "data" / "before_packages" / "models"
    shutil.copytree(saved, tmp_path / "models")
    record = tmp_path / "models" / "vgg16-block5_pool-logreg.json"
    given = runner.invoke(app, ["predict", str(record), str(tmp_path)])
    assert given.exit_code == 2 and f"give the model beside it, {record.with_suffix('.joblib')}" in given.stderr
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "pipe")
    shown = runner.invoke(
        app,
        ["predict", str(record.with_suffix(".joblib")), str(tmp_path / "empty"), str(tmp_path / "pipe"), "-f", "json"],
    )
    assert shown.exit_code == 1, shown.output  # nothing could be read
    errors = {Path(a["filename"]).name: a["error"] for a in json.loads(shown.stdout)}
    assert errors == {"empty": "a folder with no image files in it", "pipe": "not a regular file"}
    assert "Predicting" not in shown.stderr  # no progress bar over zero images
