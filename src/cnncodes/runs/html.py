"""`compare --html`: a self-contained page of the ranked runs, with the pictures people would rather look at.

Confusion matrices, reliability diagrams and thumbnails of the most confident mistakes are
inlined as data URIs, so the page is one file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.core.progress import warn
from cnncodes.runs.evaluate import ECE_BINS, confidence_bins
from cnncodes.runs.report import COLUMNS, explain, rows


def html_report(records: Sequence[dict[str, Any]], mistakes: int = 12) -> str:
    """A self-contained page: the table, a confusion matrix per run, per-class scores, the chosen run's worst mistakes.

    Args:
        records: as `rank` returns them, the chosen run first.
        mistakes: how many of the chosen run's most confident mistakes to show.

    Returns:
        The page.
    """
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
        f"{first['n_test']} test images, in the order they are chosen in: by CV score, or validation accuracy for "
        "runs without one (select); the test images only report.</p>"
        + _html_table(COLUMNS, [list(row.values()) for row in rows(records)])
        + f"<p>{html.escape(explain(records))}</p>"
    )


def _run_html(record: dict[str, Any]) -> str:
    per_class = [
        [name, f"{s['precision']:.2f}", f"{s['recall']:.2f}", f"{s['f1']:.2f}", s["support"]]
        for name, s in record["per_class"].items()
    ]
    return (
        f"<h2>{html.escape(record['run'])}{' (chosen)' if record.get('chosen') else ''}</h2>"
        f"<img alt='confusion matrix' src='{_confusion_png(record)}'>"
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


def _mistakes_html(chosen: dict[str, Any], limit: int) -> str:
    from cnncodes.data.remote import joined

    wrong = [p for p in chosen.get("test_predictions", []) if p["predicted"] != p["label"]]
    wrong.sort(key=lambda p: -p["probability"])
    heading = f"<h2>Most confident mistakes of the chosen run, {html.escape(chosen['run'])}</h2>"
    if not wrong:
        return f"{heading}<p>None: every test image is right.</p>"
    figures, missing = [], 0
    for p in wrong[:limit]:
        caption = f"{p['path']}<br>true {p['label']}, predicted {p['predicted']} ({100 * p['probability']:.0f}%)"
        thumbnail = _thumbnail(joined(chosen["dataset"]["data"], p["path"]))
        missing += thumbnail is None
        figures.append(
            f"<figure>{thumbnail or '<div>(image not found)</div>'}"
            f"<figcaption>{html.escape(caption).replace('&lt;br&gt;', '<br>')}</figcaption></figure>"
        )
    if missing:
        warn(
            f"{missing} of the mistakes' images cannot be read in {chosen['dataset']['data']} (moved?): "
            "the report names them without pictures"
        )
    return f"{heading}<div class='thumbs'>{''.join(figures)}</div>"


def _thumbnail(path: Path | str) -> str | None:
    """The image (a file or an object) as an inline JPEG of at most 150 px; None if it cannot be read."""
    from cnncodes.data.decode import BadImage, load_rgb
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
