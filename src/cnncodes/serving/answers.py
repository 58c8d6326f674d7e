"""`predict`'s answers rendered: a rich table for a terminal, JSON (as `serve` answers) or CSV."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import csv_text
from cnncodes.serving.predict import Prediction


def predictions_table(results: Sequence[Prediction], top_k: int) -> Table:
    """`predict`'s answers for a terminal: one row per image, its error in red where it had one."""
    table = Table("image", "label", "probability", f"top {top_k}")
    table.columns[0].overflow = "fold"  # paths wrap rather than lose their file name
    for r in results:
        top = ", ".join(f"{t['label']} {100 * t['probability']:.0f}%" for t in r.top_k)
        table.add_row(
            Text(r.filename),
            Text(r.label) if r.label else Text(r.error or "", style="red"),
            f"{r.probability:.3f}" if r.probability is not None else "",
            Text(top),
        )
    return table


def render_predictions(results: Sequence[Prediction], fmt: str) -> str:
    """`predict`'s answers as JSON (the fields `cnncodes serve` answers with) or CSV (a `path` column)."""
    if fmt == "json":
        return json.dumps([r.to_dict() for r in results], indent=2) + "\n"
    if fmt != "csv":
        raise CnnCodesError(f"unknown format {fmt!r}: use csv or json")
    rows = [
        (
            r.filename,
            r.label or "",
            "" if r.probability is None else f"{r.probability:.6f}",
            ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r.top_k),
            r.error or "",
        )
        for r in results
    ]
    return csv_text(("path", "label", "probability", "top_k", "error"), rows)
