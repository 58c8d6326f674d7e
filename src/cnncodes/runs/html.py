"""`compare --html`: a self-contained page of the ranked runs, with the pictures people would rather look at.

Confusion matrices, reliability diagrams (`runs.plots`) and thumbnails of the most confident
mistakes are inlined as data URIs, so the page is one file that opens anywhere, offline. Every
title and caption is text on the page, sized to its figure and wrapped there (a long file name
breaks anywhere), so none is cut off or runs into another at any window width.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from cnncodes.codes.duplicates import DUPLICATES_FILE, SHEET_FILE
from cnncodes.core.progress import warn
from cnncodes.runs.plots import Picture, confusion_png, reliability_png
from cnncodes.runs.report import COLUMNS, explain, rows

_THUMB = 150  # pixels of a mistake's thumbnail side
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
    ".about{color:#444}.wide{overflow-x:auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "h1,h2{overflow-wrap:anywhere}figure{margin:0;max-width:100%}figure img{display:block;max-width:100%;height:auto}"
    "figcaption{font-size:13px;color:#333;overflow-wrap:anywhere;margin-top:4px}"
    ".plots{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start;margin-bottom:12px}"
    f".thumbs{{display:flex;flex-wrap:wrap;gap:12px}}.thumbs figure{{width:{_THUMB}px}}"
    ".thumbs figcaption{font-size:12px}"
)


def html_report(
    records: Sequence[dict[str, Any]],
    mistakes: int = 12,
    *,
    maps: Mapping[str, str] | None = None,
    sheet: str | None = None,
) -> str:
    """A self-contained page: the table, a confusion matrix per run, per-class scores, the chosen run's worst mistakes.

    Args:
        records: as `rank` returns them, the chosen run first.
        mistakes: how many of the chosen run's most confident mistakes to show.
        maps: heat maps of the mistakes (`cnncodes explain`'s pictures as data URIs) by their test path,
            shown instead of plain thumbnails.
        sheet: the link to the contact sheet those maps come from.

    Returns:
        The page.
    """
    sections = [_about_html(records), _table_html(records)]
    sections += [_run_html(r) for r in records]
    sections.append(_mistakes_html(records[0], mistakes, maps or {}, sheet))
    sections.append(_duplicates_html(records[0]))
    return readable(
        f"<!doctype html><html><head><meta charset='utf-8'><title>cnncodes comparison</title>"
        f"<style>{STYLE}</style></head><body><h1>cnncodes comparison</h1>{''.join(sections)}</body></html>\n"
    )


def readable(text: str) -> str:
    """Text for a page or a plot: bytes of a file name that are not UTF-8 (kept as surrogates) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _about_html(records: Sequence[dict[str, Any]]) -> str:
    """Which dataset the runs saw and when they ran, and when the page was made: a report read later says so."""
    data = str(records[0]["dataset"]["data"])
    name = PurePosixPath(data.replace("\\", "/").rstrip("/")).name or data
    days = sorted({str(r["created"])[:10] for r in records if r.get("created")})
    ran = f"runs made {days[0]}" + (f" to {days[-1]}" if len(days) > 1 else "") + ", " if days else ""
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<p class='about'>Dataset <b class='dataset'>{html.escape(name)}</b> ({html.escape(data)}); "
        f"{html.escape(ran)}report made <span class='date'>{made}</span>.</p>"
    )


def html_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """A table of text cells (escaped), scrolling sideways in a narrow window.

    Args:
        header: the column names.
        body: the rows.

    Returns:
        The HTML.
    """
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<div class='wide'><table><tr>{head}</tr>{lines}</table></div>"


def _table_html(records: Sequence[dict[str, Any]]) -> str:
    first = records[0]
    return (
        f"<p>{len(records)} runs on one split ({html.escape(str(first['dataset'].get('split_fingerprint'))[:12])}), "
        f"{first['n_test']} test images, in the order they are chosen in: by CV score, or validation accuracy for "
        "runs without one (select); the test images only report.</p>"
        + html_table(COLUMNS, [list(row.values()) for row in rows(records)])
        + f"<p>{html.escape(explain(records))}</p>"
    )


def _run_html(record: dict[str, Any]) -> str:
    per_class = [
        [name, f"{s['precision']:.2f}", f"{s['recall']:.2f}", f"{s['f1']:.2f}", s["support"]]
        for name, s in record["per_class"].items()
    ]
    accuracy = f"{100 * record['accuracy']:.1f}% of {record['n_test']} test images right"
    figures = [
        figure(
            confusion_png(record), "confusion matrix", f"Confusion matrix ({accuracy}): rows true, columns predicted."
        )
    ]
    reliability = reliability_png(record)
    first = " on the first split" if "repeats" in record else ""  # whose test predictions the diagram shows
    ece = "" if record.get("ece") is None else f"ECE {record['ece']:.3f}{first}: "
    figures.append(
        figure(
            reliability,
            "reliability diagram",
            f"Reliability ({ece}accuracy per bin of top-1 probability; the diagonal is a calibrated model, the grey "
            "bars count the test images in each bin).",
        )
        if reliability
        else "<p>No reliability diagram: the run recorded no probabilities.</p>"
    )
    return (
        f"<section class='run'><h2>{html.escape(record['run'])}{' (chosen)' if record.get('chosen') else ''}</h2>"
        f"<div class='plots'>{''.join(figures)}</div>"
        + html_table(("class", "precision", "recall", "F1", "support"), per_class)
        + "</section>"
    )


def figure(picture: Picture, alt: str, caption: str) -> str:
    """A picture with its caption below, as wide as the picture (narrower windows shrink both).

    Args:
        picture: the inline PNG.
        alt: its alternative text.
        caption: the caption, as text.

    Returns:
        The HTML.
    """
    return (
        f"<figure style='width:{picture.width}px'><img alt='{alt}' src='{picture.uri}' width='{picture.width}' "
        f"height='{picture.height}'><figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def confident_mistakes(record: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """A run's wrong test predictions, the most confident first: the ones most worth a look.

    Args:
        record: a run record with its `test_predictions`.
        limit: how many at most.

    Returns:
        The predictions (`path`, `label`, `predicted`, `probability`).
    """
    wrong = [p for p in record.get("test_predictions", []) if p["predicted"] != p["label"]]
    return sorted(wrong, key=lambda p: -(p.get("probability") or 0.0))[:limit]


def _mistakes_html(chosen: dict[str, Any], limit: int, maps: Mapping[str, str], sheet: str | None) -> str:
    from cnncodes.data.remote import joined

    wrong = confident_mistakes(chosen, limit)
    heading = f"<h2>Most confident mistakes of the chosen run, {html.escape(chosen['run'])}</h2>"
    if not wrong:
        return f"{heading}<p>None: every test image is right.</p>"
    if maps:
        link = f" (<a href='{html.escape(sheet)}'>all maps</a>)" if sheet else ""
        heading += f"<p>Where the model found the evidence for its wrong answer{link}.</p>"
    figures, missing = [], 0
    for p in wrong:
        sure = "" if p.get("probability") is None else f" ({100 * p['probability']:.0f}%)"
        shown = maps.get(p["path"])
        picture = f"<img alt='' src='{shown}'>" if shown else thumbnail(joined(chosen["dataset"]["data"], p["path"]))
        missing += picture is None
        figures.append(
            f"<figure>{picture or '<div>(image not found)</div>'}<figcaption>{html.escape(p['path'])}<br>"
            f"true {html.escape(p['label'])}, predicted {html.escape(p['predicted'])}{sure}</figcaption></figure>"
        )
    if missing:
        warn(
            f"{missing} of the mistakes' images cannot be read in {chosen['dataset']['data']} (moved?): "
            "the report names them without pictures"
        )
    return f"{heading}<div class='thumbs'>{''.join(figures)}</div>"


def _duplicates_html(chosen: dict[str, Any]) -> str:
    """The features folder's sheet of near-duplicate groups, when the split kept any together: the reader judges them.

    Groups that span classes come first on the sheet: the same picture under two labels, or
    different pictures joined by too high a `--dup-threshold`.
    """
    features = chosen["dataset"].get("features")
    if not features:
        return ""
    folder = Path(features)
    try:
        with (folder / DUPLICATES_FILE).open(encoding="utf-8") as listing:
            if next(listing, None) is None or next(listing, None) is None:  # a header alone: no group
                return ""
        png = (folder / SHEET_FILE).read_bytes()
        with Image.open(io.BytesIO(png)) as drawn:
            width, height = drawn.size
    except (OSError, ValueError):
        return ""
    picture = Picture(f"data:image/png;base64,{base64.b64encode(png).decode()}", width, height)
    return (
        "<h2>Near-duplicate groups</h2><p>Images the split kept in one subset as copies of each other (groups that "
        f"span classes first); every group is listed in {html.escape(str(folder / DUPLICATES_FILE))}.</p>"
        + figure(picture, "near-duplicate groups", f"{folder / SHEET_FILE}")
    )


def thumbnail(path: Path | str) -> str | None:
    """The image (a file or an object) as an inline JPEG `<img>` of at most `_THUMB` px.

    Args:
        path: the image, local or in an object store.

    Returns:
        The HTML, or None if the image cannot be read.
    """
    from cnncodes.data.decode import BadImage, load_rgb
    from cnncodes.data.remote import local_file

    try:
        with local_file(path) as local:
            im = load_rgb(local, draft_size=_THUMB)
    except (BadImage, OSError):
        return None
    im.thumbnail((_THUMB, _THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return f"<img alt='' src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
