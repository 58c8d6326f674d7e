"""`compare`: run records ranked in one table, as text, Markdown, CSV, JSON or an HTML report."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from cnncodes.core.errors import CnnCodesError
from cnncodes.runs.evaluate import mcnemar_p, paired_p

COLUMNS = (
    "rank",
    "run",
    "method",
    "backbone",
    "layer",
    "classifier",
    "accuracy",
    "p vs best",
    "balanced acc",
    "macro-F1",
    "ECE",
    "AUROC",
    "fit s",
    "extract s",
    "model size",
)
# A terminal is narrow: the run name stands for backbone, layer and classifier there, and
# below `WIDE` columns only what ranks and trusts a run is shown.
TERMINAL_COLUMNS = {
    "rank": "#",
    "run": "run",
    "method": "method",
    "accuracy": "accuracy",
    "p vs best": "p",
    "balanced acc": "bal.acc",
    "macro-F1": "F1",
    "ECE": "ECE",
    "AUROC": "AUROC",
    "fit s": "fit s",
    "extract s": "extr s",
    "model size": "size",
}
NARROW_COLUMNS = ("rank", "run", "accuracy", "p vs best", "ECE", "AUROC")
WIDE = 120
# Below this p-value a run is marked significantly worse than the best one.
ALPHA = 0.05
Format = Literal["table", "markdown", "csv", "json"]


def compare(models: Path | str | Sequence[Path | str]) -> list[dict[str, Any]]:
    """Every run record in the `models` folders, best first, each with `p_vs_best` (see `rank`).

    Args:
        models: folders written by `fit_svm` and `finetune` (their `out`), or one of them.
    """
    from cnncodes.runs.records import load_records

    folders = [models] if isinstance(models, (str, os.PathLike)) else models
    return rank(load_records([Path(m) for m in folders]))


def rank(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first (by the mean over repeated splits when a run has them), each with `p_vs_best`.

    Refuses records made on different splits, whose test sets differ. `p_vs_best` is the
    p-value that the run is as good as the best, against its being worse (one-sided): a paired
    t-test over the per-split scores when both ran on the same repeated splits, else McNemar's
    exact test on their right and wrong answers for the same test images (1 for the best run
    itself). One-sided, because a run ranked by its mean over splits below a single-split run
    may have done better on the images they share: that is never "significantly worse".
    """
    _same_test_set(records)
    ranked = sorted(
        records,
        key=lambda r: (
            -r.get("accuracy_mean", r["accuracy"]),
            -r["accuracy"],
            -r["balanced_accuracy"],
            r["fit_seconds"],
            r["run"],
        ),
    )
    best = ranked[0]
    return [r | _p_vs_best(r, best) for r in ranked]


def _same_test_set(records: Sequence[dict[str, Any]]) -> None:
    splits: dict[str, list[str]] = {}
    for record in records:
        fingerprint = record.get("dataset", {}).get("split_fingerprint")
        if not fingerprint or "test_predictions" not in record:
            raise CnnCodesError(
                f"{record.get('record_path', record.get('run'))} has no split fingerprint or test "
                "predictions, so it cannot be compared: fit that run again"
            )
        splits.setdefault(fingerprint, []).append(record["run"])
    if len(splits) > 1:
        groups = "; ".join(f"split {fp[:10]}: {', '.join(runs)}" for fp, runs in splits.items())
        raise CnnCodesError(
            f"these runs were scored on different test sets and cannot be ranked together ({groups}): "
            "compare the folders of one split separately"
        )
    tests: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for record in records:
        test = tuple(sorted((p["path"], p["label"]) for p in record["test_predictions"]))
        tests.setdefault(test, []).append(record["run"])
    if len(tests) > 1:  # no run is blamed: any of the groups may be the changed one
        groups = "; ".join(
            f"{', '.join(runs)}: {len(test)} test images"
            for test, runs in sorted(tests.items(), key=lambda item: -len(item[1]))
        )
        raise CnnCodesError(
            f"these runs claim the same split but were scored on different test images ({groups}): "
            "records were changed or made by another version; fit those runs again"
        )


def _p_vs_best(record: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    if record is best:
        return {"p_vs_best": 1.0, "p_vs_best_test": "best"}
    seeds = [r["seed"] for r in record.get("repeats", [])]
    if len(seeds) > 1 and seeds == [r["seed"] for r in best.get("repeats", [])]:
        return {
            "p_vs_best": paired_p(
                [r["accuracy"] for r in record["repeats"]], [r["accuracy"] for r in best["repeats"]], "less"
            ),
            "p_vs_best_test": "paired t",
        }
    return {"p_vs_best": mcnemar_p(_right(record), _right(best), "less"), "p_vs_best_test": "McNemar"}


def _right(record: dict[str, Any]) -> np.ndarray:
    """Right or wrong per test image, in path order, so two runs pair image by image."""
    return np.array([p["predicted"] == p["label"] for p in sorted(record["test_predictions"], key=lambda p: p["path"])])


def rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Display rows in `COLUMNS` order: accuracy with its 95% interval (or mean ±sd over repeated splits, and the
    calibration scores' means), sizes in KB/MB."""
    return [
        dict(
            zip(
                COLUMNS,
                (
                    str(i),
                    r["run"],
                    r["method"],
                    r["backbone"],
                    r["layer"],
                    r.get("classifier") or "-",
                    _accuracy(r),
                    _p(r),
                    f"{100 * r['balanced_accuracy']:.1f}%",
                    f"{100 * r['macro_f1']:.1f}%",
                    _number(r.get("ece_mean", r.get("ece"))),
                    _number(r.get("confidence_auroc_mean", r.get("confidence_auroc"))),
                    f"{r['fit_seconds']:.1f}",
                    _seconds(r.get("extract_seconds")),
                    _size(r["model_bytes"]),
                ),
            )
        )
        for i, r in enumerate(records, start=1)
    ]


def _accuracy(record: dict[str, Any]) -> str:
    if "accuracy_mean" in record:
        return f"{100 * record['accuracy_mean']:.1f}% ±{100 * record['accuracy_sd']:.1f}"
    low, high = record["accuracy_ci95"]
    return f"{100 * record['accuracy']:.1f}% [{100 * low:.0f}–{100 * high:.0f}]"


def _p(record: dict[str, Any]) -> str:
    if "p_vs_best" not in record or record.get("p_vs_best_test") == "best":
        return "best" if "p_vs_best" in record else "-"
    return f"{record['p_vs_best']:.2g}{' *' if record['p_vs_best'] < ALPHA else ''}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def rich_table(records: Sequence[dict[str, Any]], title: str | None = None, width: int = WIDE) -> Table:
    """The ranked runs for a terminal `width` columns wide: only the columns that rank and trust unless all fit."""
    wide = _table(records, title, list(TERMINAL_COLUMNS))
    if width >= WIDE and _measured(wide) <= width:
        return wide
    return _table(records, title, [n for n in TERMINAL_COLUMNS if n in NARROW_COLUMNS])


def _table(records: Sequence[dict[str, Any]], title: str | None, names: list[str]) -> Table:
    marked = any(r.get("p_vs_best", 1.0) < ALPHA for r in records)
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        caption=f"* significantly worse than the best run (p < {ALPHA})" if marked else None,
    )
    for name in names:
        table.add_column(
            TERMINAL_COLUMNS[name],
            overflow="fold",
            no_wrap=name != "run",
            min_width=min(len(max((r["run"] for r in records), key=len)), 36) if name == "run" else None,
        )
    for row in rows(records):
        table.add_row(*(row[name] for name in names))
    return table


def _measured(table: Table) -> int:
    """The width `table` takes with nothing wrapped (run names with folders can make the wide layout too wide)."""
    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum


def render(records: Sequence[dict[str, Any]], fmt: str) -> str:
    """The ranked records as Markdown, CSV or JSON (a list of the full run records)."""
    if fmt == "json":
        return json.dumps([{k: v for k, v in r.items() if k != "record_path"} for r in records], indent=2) + "\n"
    table = rows(records)
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row.values()) + " |" for row in table]) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return buf.getvalue()
    raise CnnCodesError(f"unknown format {fmt!r}: render writes markdown, csv or json (rich_table draws the table)")


def indistinguishable(records: Sequence[dict[str, Any]]) -> str:
    """One sentence: which runs the tests cannot tell from the best one (the marked ones are worse)."""
    best, rest = records[0], records[1:]
    tied = [r["run"] for r in rest if r.get("p_vs_best", 0.0) >= ALPHA]
    tests = sorted({r["p_vs_best_test"] for r in rest if "p_vs_best_test" in r})
    how = f" ({' and '.join(tests)}, p ≥ {ALPHA}; * marks the runs significantly worse)" if tests else ""
    if not rest:
        return f"{best['run']} is the only run."
    if not tied:
        return f"Every other run is significantly worse than {best['run']}{how}."
    return f"Statistically indistinguishable from the best run, {best['run']}{how}: {', '.join(tied)}."
