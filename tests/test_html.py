"""`compare --html` looked at in a real headless browser: nothing cut, nothing overprinted, every picture loads."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnncodes.runs.plots import plot_names
from cnncodes.runs.records import build_record, publish_run

from .helpers import SAVED_RECORD, cli, record_fields

IMAGES = SAVED_RECORD.parents[1] / "images"  # the saved record's test images
# Class names a plot's default font cannot draw as they are: a CJK ideograph, a carriage return, a dollar sign.
NAMES = {"circles": "猫 cat", "squares": "a\rb", "stripes": "$5 stripes"}
LONG_RUN = "mobilenetv2-out_relu-logreg-with-a-run-name-far-longer-than-any-title-would-expect"
LONG_FILE = "a_very_long_file_name_without_a_single_space_to_break_at_" * 2
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
# Measures the page once it has loaded and writes what it found into the DOM, which --dump-dom prints.
MEASURE = """<script>
window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const texts = [...document.querySelectorAll('h1, h2, p, figcaption')].map(e => ({
    tag: e.tagName, text: e.textContent.slice(0, 60), box: box(e),
    overflows: e.scrollWidth > e.clientWidth + 1 }));
  const figures = [...document.querySelectorAll('figure')].map(f => ({
    box: box(f), parts: [...f.children].map(box), caption: f.querySelector('figcaption').textContent.slice(0, 60) }));
  const images = [...document.images].map(i => ({ alt: i.alt, loaded: i.complete && i.naturalWidth > 0 }));
  const out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = JSON.stringify({ texts, figures, images, pageWidth: document.documentElement.scrollWidth,
                                     windowWidth: window.innerWidth, body: document.body.innerText });
  document.body.appendChild(out);
});
</script>"""


def publish(models: Path, data: Path, run: str) -> None:
    """The saved record as `run`, its classes renamed to `NAMES`, its test images copied under long names."""
    made = record_fields(run=run)
    predictions = []
    for p in made["test_predictions"]:
        long = f"{p['path'].split('/')[0]}/{LONG_FILE}{Path(p['path']).name}"
        (data / long).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGES / p["path"], data / long)
        predictions.append(p | {"path": long, "label": NAMES[p["label"]], "predicted": NAMES[p["predicted"]]})
    record = made | {
        "classes": [NAMES[c] for c in made["classes"]],
        "per_class": {NAMES[c]: scores for c, scores in made["per_class"].items()},
        "test_predictions": predictions,
        "dataset": made["dataset"] | {"data": str(data)},
    }
    publish_run(models / f"{run}.joblib", lambda tmp: tmp.write_bytes(b"model"), build_record(**record))


@pytest.fixture
def page(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> Path:
    models, data = tmp_path / "models", tmp_path / "flowers"
    for run in ("mobilenetv2-out_relu-knn", LONG_RUN):
        publish(models, data, run)
    result = cli("compare", models, "--html", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    return tmp_path / "report.html"


def test_class_names_a_font_lacks_draw_without_a_warning_and_the_page_names_them_as_they_are(page, recwarn):
    said = [str(w.message) for w in recwarn if not issubclass(w.category, DeprecationWarning)]
    # the fixture's models are stand-in bytes: the report says it shows their mistakes without heat maps
    assert [m for m in said if "without heat maps" not in m] == []
    text = page.read_bytes().decode()  # a carriage return kept as it is
    assert "猫 cat" in text and "a\rb" in text and "$5 stripes" in text
    drawn = plot_names(list(NAMES.values()))
    assert drawn.names[1] == "a\\rb" and drawn.names[2] == "\\$5 stripes"  # a literal dollar, no mathematics
    assert drawn.names[0] in ("猫 cat", "\\u732b cat")  # as it is when an installed font has the glyph


def pictures(page: Path) -> list[Image.Image]:
    found = re.findall(r"src='data:image/png;base64,([^']+)'", page.read_text())
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("L") for b in found]


def test_nothing_drawn_touches_a_picture_s_edge_so_no_label_is_cut(page):
    plots = pictures(page)
    assert len(plots) == 4  # a confusion matrix and a reliability diagram per run
    for im in plots:
        pixels = np.asarray(im)
        edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert edge.min() >= 250, "ink at the edge of a picture: something is cut off"


@pytest.mark.skipif(
    BROWSER is None and not os.environ.get("CI"),
    reason="no chromium on PATH (CI installs it: .ci/run; apt-get install chromium)",
)
@pytest.mark.parametrize("width", [1280, 480])
def test_in_a_browser_no_title_or_caption_is_cut_or_overprinted_and_every_image_loads(page, tmp_path, width):
    if BROWSER is None:
        pytest.fail("CI: no chromium on PATH, although .ci/run installs it")
    measured_page = tmp_path / "measured.html"
    measured_page.write_text(page.read_text().replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    args = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},900"]
    args += ["--virtual-time-budget=10000", "--dump-dom", measured_page.as_uri()]
    dom = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r"<pre id=\"measured\">(.*?)</pre>", dom, re.S)
    assert found, f"the page did not finish loading in {BROWSER}"
    measured = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))

    assert measured["images"] and all(i["loaded"] for i in measured["images"]), measured["images"]
    assert len(measured["images"]) == 4 + 3  # the plots and the chosen run's three mistakes
    assert measured["pageWidth"] <= measured["windowWidth"], "the page is wider than the window"
    texts = measured["texts"]
    assert [t["text"] for t in texts if t["overflows"]] == []
    for i, a in enumerate(texts):
        for b in texts[i + 1 :]:
            assert not overlap(a["box"], b["box"]), f"{a['text']!r} runs into {b['text']!r}"
    for figure in measured["figures"]:
        assert all(inside(part, figure["box"]) for part in figure["parts"]), figure["caption"]
    for a, b in ((a, b) for i, a in enumerate(measured["figures"]) for b in measured["figures"][i + 1 :]):
        assert not overlap(a["box"], b["box"]), f"{a['caption']!r} runs into {b['caption']!r}"

    body = " ".join(measured["body"].split())
    assert "Dataset flowers (" in body and LONG_RUN in body
    assert datetime.now(timezone.utc).strftime("%Y-%m-%d") in body  # the runs' and the page's date


def overlap(a: list[float], b: list[float]) -> bool:
    """Whether two boxes (left, top, right, bottom) share more than a pixel's sliver."""
    return min(a[2], b[2]) - max(a[0], b[0]) > 1 and min(a[3], b[3]) - max(a[1], b[1]) > 1


def inside(part: list[float], box: list[float]) -> bool:
    return part[0] >= box[0] - 1 and part[1] >= box[1] - 1 and part[2] <= box[2] + 1 and part[3] <= box[3] + 1


@pytest.mark.parametrize("classes", [["cats", "dogs"], ["a", "b", "c", "d", "e"]])
def test_the_reliability_diagram_sits_each_bar_on_its_bin_names_its_marks_and_wastes_no_half(classes, monkeypatch):
    from cnncodes.runs import plots
    from cnncodes.runs.evaluate import ECE_BINS

    drawn = []
    monkeypatch.setattr(plots, "picture", drawn.append)
    confident = np.random.default_rng(0).uniform(1 / len(classes), 1, size=60)
    predictions = [
        {"path": f"{i}.png", "label": classes[0], "predicted": classes[i % 3 == 0], "probability": float(p)}
        for i, p in enumerate(confident)
    ]
    plots.reliability_png({"classes": classes, "test_predictions": predictions})
    figure = drawn[0]
    top, bottom = figure.axes
    low = bottom.get_xlim()[0]
    assert 1 / len(classes) - 1 / ECE_BINS < low <= 1 / len(classes)  # two classes: no bin below 0.5 is empty space
    for axes in (top, bottom):
        spans = sorted((bar.get_x(), bar.get_x() + bar.get_width()) for bar in axes.patches)
        assert all(right <= next_left + 1e-9 for (_, right), (next_left, _) in itertools.pairwise(spans))  # no overlap
        edges = np.array([left for left, _ in spans]) * ECE_BINS
        np.testing.assert_allclose(edges, np.round(edges), atol=1e-9)  # each bar on its bin's edges
    assert sum(bar.get_height() for bar in bottom.patches) == len(predictions)
    assert sorted(t.get_text() for t in figure.legends[0].get_texts()) == ["accuracy in bin", "calibrated", "images"]
