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
    "select",
    "accuracy",
    "p vs chosen",
    "balanced acc",
    "macro-F1",
    "ECE",
    "AUROC",
    "fit s",
    "extract s",
    "model size",
)
# A terminal is narrow: the run name stands for backbone, layer and classifier there, and
# below `WIDE` columns only what chooses and trusts a run is shown.
TERMINAL_COLUMNS = {
    "rank": "#",
    "run": "run",
    "method": "method",
    "select": "select",
    "accuracy": "accuracy",
    "p vs chosen": "p",
    "balanced acc": "bal.acc",
    "macro-F1": "F1",
    "ECE": "ECE",
    "AUROC": "AUROC",
    "fit s": "fit s",
    "extract s": "extr s",
    "model size": "size",
}
NARROW_COLUMNS = ("rank", "run", "select", "accuracy", "p vs chosen", "ECE", "AUROC")
WIDE = 120
# Below this p-value a run's test accuracy is marked as differing from the chosen run's.
ALPHA = 0.05
# What the selection score of a run is, by `selected_on`.
SELECTED_ON = {"cv": "CV score", "val": "validation accuracy"}
Format = Literal["table", "markdown", "csv", "json"]


def compare(models: Path | str | Sequence[Path | str]) -> list[dict[str, Any]]:
    """Every run record in the `models` folders, the chosen run first, each tested against it (see `rank`).

    Args:
        models: folders written by `fit_svm` and `finetune` (their `out`), or one of them.

    Returns:
        The records as `rank` returns them.
    """
    from cnncodes.runs.records import load_records

    folders = [models] if isinstance(models, (str, os.PathLike)) else models
    return rank(load_records([Path(m) for m in folders]))


def rank(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs in the order they are chosen in: by their selection score, never by their test accuracy.

    The test subset is used once, to report: choosing the run with the best test accuracy would
    make that accuracy a biased estimate, and often crown a run that is ahead by one lucky image.
    A run's selection score is its CV score, or, for a fine-tune (which has none), the validation
    accuracy of the weights its early stopping kept. Ties go to the cheaper fit (fit seconds);
    runs without either score (recorded by an older version) come last. The first run is the
    chosen one.

    Args:
        records: run records scored on one split (`load_records`).

    Returns:
        The records, each with `chosen` (True for the first), `selection_score` and `selected_on`
        ("cv", "val" or None), and `p_vs_chosen`: the two-sided p-value that its test accuracy
        differs from the chosen run's (a paired t-test over the per-split scores when both ran on the
        same repeated splits, else McNemar's exact test on the same test images; None for the chosen
        run itself), with `p_vs_chosen_test` naming the test.

    Raises:
        CnnCodesError: records made on different splits, whose test sets differ.
    """
    _same_test_set(records)
    ranked = sorted(records, key=_order)
    chosen = ranked[0]
    return [r | _selection(r) | {"chosen": r is chosen} | _p_vs_chosen(r, chosen) for r in ranked]


def _selection(record: dict[str, Any]) -> dict[str, Any]:
    """The score a run is chosen on, and what it is: its CV score (on the val subset with `fit-svm --cv 0`),
    else a fine-tune's validation accuracy."""
    if record.get("cv_score") is not None:
        on = "val" if record.get("params", {}).get("cv") == "val" else "cv"
        return {"selection_score": record["cv_score"], "selected_on": on}
    if record.get("val_score") is not None:
        return {"selection_score": record["val_score"], "selected_on": "val"}
    return {"selection_score": None, "selected_on": None}


def _order(record: dict[str, Any]) -> tuple[bool, float, float, str]:
    score = _selection(record)["selection_score"]
    return score is None, -(score or 0.0), record["fit_seconds"], record["run"]


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


def _p_vs_chosen(record: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    if record is chosen:
        return {"p_vs_chosen": None, "p_vs_chosen_test": None}
    seeds = [r["seed"] for r in record.get("repeats") or []]
    if len(seeds) > 1 and seeds == [r["seed"] for r in chosen.get("repeats") or []]:
        mine, its = ([r["accuracy"] for r in run["repeats"]] for run in (record, chosen))
        return {"p_vs_chosen": paired_p(mine, its), "p_vs_chosen_test": "paired t"}
    return {"p_vs_chosen": mcnemar_p(_right(record), _right(chosen)), "p_vs_chosen_test": "McNemar"}


def _right(record: dict[str, Any]) -> np.ndarray:
    """Right or wrong per test image, in path order, so two runs pair image by image."""
    return np.array([p["predicted"] == p["label"] for p in sorted(record["test_predictions"], key=lambda p: p["path"])])


def rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Display rows in `COLUMNS` order: the selection score and what it is ("0.956 cv"), accuracy with its 95%
    interval (or mean ±sd over repeated splits, and the calibration scores' means), "chosen" or the p-value
    against the chosen run, sizes in KB/MB."""
    return [
        dict(
            zip(
                COLUMNS,
                (
                    str(i),
                    r["run"],
                    r["method"],
                    r["backbone"],
                    r.get("layer") or "-",
                    r.get("classifier") or "-",
                    _select(r),
                    _accuracy(r),
                    _p(r),
                    _percent(r["balanced_accuracy"]),
                    _percent(r.get("macro_f1")),
                    _number(r.get("ece_mean", r.get("ece"))),
                    _number(r.get("confidence_auroc_mean", r.get("confidence_auroc"))),
                    f"{r['fit_seconds']:.1f}",
                    _seconds(r.get("extract_seconds")),
                    _size(r.get("model_bytes")),
                ),
            )
        )
        for i, r in enumerate(records, start=1)
    ]


def _accuracy(record: dict[str, Any]) -> str:
    if record.get("accuracy_mean") is not None:
        return f"{100 * record['accuracy_mean']:.1f}% ±{100 * record['accuracy_sd']:.1f}"
    low, high = record["accuracy_ci95"]
    return f"{100 * record['accuracy']:.1f}% [{100 * low:.0f}–{100 * high:.0f}]"


def _select(record: dict[str, Any]) -> str:
    selected = _selection(record)
    return "-" if selected["selected_on"] is None else f"{selected['selection_score']:.3f} {selected['selected_on']}"


def _p(record: dict[str, Any]) -> str:
    if record.get("chosen"):
        return "chosen"
    if record.get("p_vs_chosen") is None:
        return "-"
    return f"{record['p_vs_chosen']:.2g}{' *' if _differs(record) else ''}"


def _differs(record: dict[str, Any]) -> bool:
    """Whether the run's test accuracy differs significantly from the chosen run's."""
    return record.get("p_vs_chosen") is not None and record["p_vs_chosen"] < ALPHA


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def rich_table(records: Sequence[dict[str, Any]], title: str | None = None, width: int = WIDE) -> Table:
    """The ranked runs for a terminal `width` columns wide: only the columns that choose and trust unless all fit."""
    wide = _table(records, title, list(TERMINAL_COLUMNS))
    if width >= WIDE and _measured(wide) <= width:
        return wide
    narrow = _table(records, title, [n for n in TERMINAL_COLUMNS if n in NARROW_COLUMNS])
    if _measured(narrow) <= width:
        return narrow
    # Whole run names and every number rather than ECE (AUROC says as much about trusting a run).
    return _table(records, title, [n for n in TERMINAL_COLUMNS if n in NARROW_COLUMNS and n != "ECE"])


def _table(records: Sequence[dict[str, Any]], title: str | None, names: list[str]) -> Table:
    shown = {_selection(r)["selected_on"] for r in records}
    named = [f"{on} = {what}" for on, what in SELECTED_ON.items() if on in shown]
    legend = [f"select: {', '.join(named)}"] if named else []
    if any(map(_differs, records)):
        legend.append(f"* test accuracy differs from the chosen run's (two-sided p < {ALPHA})")
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        caption="; ".join(legend) or None,
    )
    for name in names:
        table.add_column(  # run names fold rather than any number being cut
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
    """The ranked records as Markdown (the table, then `explain`), CSV or JSON (a list of the full run records)."""
    if fmt == "json":
        return json.dumps([{k: v for k, v in r.items() if k != "record_path"} for r in records], indent=2) + "\n"
    table = rows(records)
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row.values()) + " |" for row in table]
        return "\n".join([*lines, "", explain(records)]) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return buf.getvalue()
    raise CnnCodesError(f"unknown format {fmt!r}: render writes markdown, csv or json (rich_table draws the table)")


def explain(records: Sequence[dict[str, Any]]) -> str:
    """Sentences for under the table: which run is chosen and on what, which runs' test accuracy differs from its,
    and which runs could not be ranked and why.

    Args:
        records: as `rank` returns them.

    Returns:
        The sentences, one paragraph.
    """
    chosen, rest = records[0], records[1:]
    sentences = [_why_chosen(chosen, bool(rest))]
    by_val = [r["run"] for r in records if r.get("selected_on") == "val" and r["method"] != "cnn-codes"]
    if by_val:
        sentences.append(
            f"No CV score for {', '.join(by_val)}: ranked on the validation accuracy of the weights early stopping kept"
        )
    tested = [r for r in rest if r.get("p_vs_chosen") is not None]
    if tested:
        tests = " and ".join(sorted({r["p_vs_chosen_test"] for r in tested}))
        differ = [r["run"] for r in tested if _differs(r)]
        found = "no other run's test accuracy differs significantly from the chosen run's"
        if differ:
            whose = (
                f"accuracy of {differ[0]} differs" if len(differ) == 1 else f"accuracies of {', '.join(differ)} differ"
            )
            found = f"the test {whose} from the chosen run's (marked *)"
        sentences.append(f"On the test images ({tests}, two-sided, p < {ALPHA}), {found}")
    unscored = [r["run"] for r in rest if r.get("selected_on") is None]
    if unscored:
        sentences.append(
            f"Ranked last, without a CV or validation score (recorded by an older version): {', '.join(unscored)}; "
            "fit or fine-tune them again to rank them"
        )
    return ". ".join(sentences) + "."


def _why_chosen(chosen: dict[str, Any], others: bool) -> str:
    if chosen.get("selected_on") is None:
        return (
            f"Listed first: {chosen['run']}; no run has a CV or validation score to be chosen on (recorded by an "
            "older version), so the fastest fit comes first: fit the runs again to choose on validation"
        )
    score = f"{SELECTED_ON[chosen['selected_on']]} {chosen['selection_score']:.3f}"
    if not others:
        return f"Chosen: {chosen['run']}, the only run ({score})"
    ties = "ties go to the faster fit, never to test accuracy"
    return f"Chosen: {chosen['run']}, the highest selection score ({score}; {ties})"
