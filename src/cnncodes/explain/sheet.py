"""`index.html`: a self-contained contact sheet of an explain run, one colour scale per class.

Each image's own picture is scaled to its own map; side by side, maps only compare on a
shared scale, so the sheet draws every map of a class with the largest value among them. The
sheet shows at most `SHEET_LIMIT` images (the first ones), so it stays small at any scale;
explain.json lists them all.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnncodes.core.files import write_bytes_atomic
from cnncodes.data.decode import BadImage, load_rgb
from cnncodes.explain.render import drawn, png_bytes, positive_top

SHEET_LIMIT = 120
_THUMBNAIL = 220
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:220px}
figure img{width:220px;display:block}
figcaption{font-size:.8em;line-height:1.3;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:1em 0}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}
"""


def write_sheet(folder: Path, run: dict[str, Any], *, size: int, resize: str) -> Path:
    """Write `folder/index.html` for an explain run (`ExplainRun.to_dict()`).

    Args:
        folder: the run's folder, holding the maps it lists.
        run: the run, as explain.json holds it.
        size: the side of the network's square.
        resize: how the square was cut from each image.

    Returns:
        The sheet's path.
    """
    shown = [entry for entry in run["images"] if entry["maps"]][:SHEET_LIMIT]
    grids = {(e["filename"], m["map"]): np.load(folder / m["map"]) for e in shown for m in e["maps"]}
    tops: dict[str, float] = defaultdict(lambda: 1e-12)
    for entry in shown:
        for m in entry["maps"]:
            tops[m["label"]] = max(tops[m["label"]], positive_top(grids[entry["filename"], m["map"]]))
    figures = [_figure(e, grids, tops, size, resize) for e in shown]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>cnncodes explain</title>"
        f"<style>{_STYLE}</style></head><body><h1>Why {html.escape(Path(run['model']).name)} decides</h1>"
        f"<p>Method: <b>{html.escape(str(run['method']))}</b>: {html.escape(str(run['units']))}. "
        f"Colours: one scale per class, 0 to the largest value among the maps shown. Dimmed: what the network "
        f"did not see. {len(shown)} of {len(run['images'])} images shown.</p>"
        f"{_faithfulness_table(run.get('faithfulness'))}<div class='grid'>{''.join(figures)}</div></body></html>"
    )
    path = folder / "index.html"
    write_bytes_atomic(path, page.encode())
    return path


def _figure(entry: dict[str, Any], grids: dict, tops: dict[str, float], size: int, resize: str) -> str:
    try:
        image = load_rgb(entry["filename"], draft_size=size)
    except BadImage:
        return ""
    image.thumbnail((_THUMBNAIL * 2, _THUMBNAIL * 2), Image.Resampling.BILINEAR)
    parts = []
    for m in entry["maps"]:
        grid = grids[entry["filename"], m["map"]]
        caption = f"{m['label']} {m['probability']:.1%}"
        picture = drawn(image, grid, size=size, resize=resize, top=tops[m["label"]], caption=caption)
        picture.thumbnail((_THUMBNAIL, _THUMBNAIL * 2), Image.Resampling.BILINEAR)
        data = base64.b64encode(png_bytes(picture)).decode()
        parts.append(f"<img alt='{html.escape(m['label'])}' src='data:image/png;base64,{data}'>")
    scores = entry.get("faithfulness") or {}
    faith = (
        f"<br>deletion {scores['deletion']:.3f} · insertion {scores['insertion']:.3f}"
        if "deletion" in scores and "insertion" in scores
        else ""
    )
    return (
        f"<figure>{''.join(parts)}<figcaption>{html.escape(Path(entry['filename']).name)}: "
        f"{html.escape(str(entry['label']))} {entry['probability']:.1%}{faith}</figcaption></figure>"
    )


def _faithfulness_table(means: dict[str, float] | None) -> str:
    """The run's mean deletion and insertion AUC beside the random map's (lower deletion, higher insertion: better)."""
    if not means:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{means.get(name, float('nan')):.3f}</td>"
        f"<td>{means.get('random_' + name, float('nan')):.3f}</td></tr>"
        for name in ("deletion", "insertion")
    )
    return (
        "<table><tr><th>AUC (mean)</th><th>these maps</th><th>random maps</th></tr>"
        f"{rows}</table><p>Deletion: lower is better; insertion: higher is better.</p>"
    )
