"""How `predict`'s answers are written: the JSON fields `cnncodes serve` shares, CSV, and the terminal table."""

from __future__ import annotations

import csv
import io
import json

import pytest
from rich.console import Console

from cnncodes.core.errors import CnnCodesError
from cnncodes.serving.answers import predictions_table, render_predictions
from cnncodes.serving.predict import Prediction

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


def test_table_shows_labels_and_errors():
    console = Console(width=200, record=True)
    console.print(predictions_table(ANSWERS, top_k=2))
    text = console.export_text()
    assert "a/cat.jpg" in text and "cat 90%, dog 10%" in text and "0.900" in text
    assert "truncated file" in text and "top 2" in text
