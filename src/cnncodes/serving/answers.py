"""`predict`'s answers rendered: a rich table for a terminal, JSON (as `serve` answers) or CSV."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import csv_text
from cnncodes.serving.predict import Prediction


def predictions_table(results: Sequence[Prediction]) -> Table:
    """`predict`'s answers for a terminal: one row per image, and an error column only when a file failed.

    The header counts the classes each row really lists ("top 2" for a two-class model asked for three).

    Args:
        results: the answers, in input order.

    Returns:
        A rich table.
    """
    listed = max((len(r.top_k) for r in results), default=0)
    errors = any(r.error for r in results)
    table = Table("image", "label", "probability", f"top {listed}" if listed > 1 else "top")
    if errors:
        table.add_column("error", style="red", overflow="fold")
    table.columns[0].overflow = "fold"  # paths wrap rather than lose their file name
    for r in results:
        top = ", ".join(f"{t['label']} {100 * t['probability']:.0f}%" for t in r.top_k)
        cells: list[str | Text] = [
            Text(r.filename),
            Text(r.label or ""),
            "" if r.probability is None else f"{r.probability:.3f}",
            Text(top),
        ]
        table.add_row(*cells, *([Text(r.error or "")] if errors else []))
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
