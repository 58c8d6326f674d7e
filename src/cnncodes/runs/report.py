"""`compare`: run records ranked in one table, as text, Markdown, CSV, JSON or an HTML report."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import csv_text
from cnncodes.core.progress import warn
from cnncodes.runs.evaluate import ECE_BINS, confidence_bins, mcnemar_p, paired_p

if TYPE_CHECKING:
    from cnncodes.serving.predict import Prediction

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


def html_report(records: Sequence[dict[str, Any]], mistakes: int = 12) -> str:
    """A self-contained page: the table, a confusion matrix per run, per-class scores, the best run's worst mistakes."""
    sections = [_table_html(records)]
    sections += [_run_html(r) for r in records]
    sections.append(_mistakes_html(records[0], mistakes))
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        ".thumbs{display:flex;flex-wrap:wrap;gap:12px}.thumbs figure{margin:0;width:150px;font-size:12px}"
    )
    return readable(
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnncodes comparison</title>"
        f"<style>{style}</style></head><body><h1>cnncodes comparison</h1>{''.join(sections)}</body></html>\n"
    )


def readable(text: str) -> str:
    """Text for a page or a plot: bytes of a file name that are not UTF-8 (kept as surrogates) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _html_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{lines}</table>"


def _table_html(records: Sequence[dict[str, Any]]) -> str:
    first = records[0]
    return (
        f"<p>{len(records)} runs on one split ({html.escape(first['dataset']['split_fingerprint'][:12])}), "
        f"{first['n_test']} test images, best first.</p>"
        + _html_table(COLUMNS, [list(row.values()) for row in rows(records)])
        + f"<p>{html.escape(indistinguishable(records))}</p>"
    )


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


def _run_html(record: dict[str, Any]) -> str:
    per_class = [
        [name, f"{s['precision']:.2f}", f"{s['recall']:.2f}", f"{s['f1']:.2f}", s["support"]]
        for name, s in record["per_class"].items()
    ]
    return (
        f"<h2>{html.escape(record['run'])}</h2><img alt='confusion matrix' src='{_confusion_png(record)}'>"
        f"<img alt='reliability diagram' src='{_reliability_png(record)}'>"
        + _html_table(("class", "precision", "recall", "F1", "support"), per_class)
    )


def _reliability_png(record: dict[str, Any]) -> str:
    """Accuracy against mean top-1 probability in the ECE's bins of the test predictions: on the diagonal
    when the probabilities can be taken at their word; bar shades show how many images fall in each bin."""
    from matplotlib.figure import Figure

    predictions = record["test_predictions"]
    confidence = np.array([p["probability"] for p in predictions])
    right = np.array([p["predicted"] == p["label"] for p in predictions])
    which = confidence_bins(confidence)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1)
    for b in np.unique(which):
        inside = which == b
        ax.bar(
            confidence[inside].mean(),
            right[inside].mean(),
            width=0.9 / ECE_BINS,
            alpha=0.3 + 0.7 * inside.sum() / len(inside),
            color="#1f77b4",
        )
    first = " (first split)" if "repeats" in record else ""  # whose test predictions the diagram shows
    ece = "" if record.get("ece") is None else f", ECE {record['ece']:.3f}{first}"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 probability", ylabel="accuracy", title=f"{record['run']}{ece}")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return _data_uri(fig)


def _confusion_png(record: dict[str, Any]) -> str:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it was
    from sklearn.metrics import ConfusionMatrixDisplay

    classes = record["classes"]
    size = 2.5 + 0.45 * len(classes)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(record["confusion_matrix"]), display_labels=[readable(c) for c in classes]).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation="vertical"
    )
    ax.set_title(f"{record['run']}: {100 * record['accuracy']:.1f}%")
    fig.tight_layout()
    return _data_uri(fig)


def _data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mistakes_html(best: dict[str, Any], limit: int) -> str:
    from cnncodes.data.remote import joined

    wrong = [p for p in best.get("test_predictions", []) if p["predicted"] != p["label"]]
    wrong.sort(key=lambda p: -p["probability"])
    if not wrong:
        return f"<h2>Most confident mistakes of {html.escape(best['run'])}</h2><p>None: every test image is right.</p>"
    figures, missing = [], 0
    for p in wrong[:limit]:
        caption = f"{p['path']}<br>true {p['label']}, predicted {p['predicted']} ({100 * p['probability']:.0f}%)"
        thumbnail = _thumbnail(joined(best["dataset"]["data"], p["path"]))
        missing += thumbnail is None
        figures.append(
            f"<figure>{thumbnail or '<div>(image not found)</div>'}"
            f"<figcaption>{html.escape(caption).replace('&lt;br&gt;', '<br>')}</figcaption></figure>"
        )
    if missing:
        warn(
            f"{missing} of the mistakes' images cannot be read in {best['dataset']['data']} (moved?): "
            "the report names them without pictures"
        )
    return f"<h2>Most confident mistakes of {html.escape(best['run'])}</h2><div class='thumbs'>{''.join(figures)}</div>"


def _thumbnail(path: Path | str) -> str | None:
    """The image (a file or an object) as an inline JPEG of at most 150 px; None if it cannot be read."""
    from cnncodes.data.ingest import BadImage, load_rgb
    from cnncodes.data.remote import local_file

    try:
        with local_file(path) as local:
            im = load_rgb(local, draft_size=150)
    except (BadImage, OSError):
        return None
    im.thumbnail((150, 150))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


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
