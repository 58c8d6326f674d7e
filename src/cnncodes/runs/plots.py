"""The pictures of `compare --html`: a confusion matrix and a reliability diagram per run, as PNG data URIs.

Titles stay out of the pictures (the page sets them as text, which wraps at any width), and
each picture is saved to the tight box around everything it draws, so no label is ever cut.
Class names are drawn in a font that has their glyphs: the default, else an installed font
that covers them; failing both, as escapes (`\\u732b`) rather than empty boxes, and without
matplotlib's warning per missing glyph. The page's text shows the names as they are.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import unicodedata
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from cnncodes.runs.evaluate import ECE_BINS, confidence_bins

_DPI = 100
_BARS, _COUNTS, _DIAGONAL = "#1f77b4", "#aaaaaa", "#666666"
# Fonts that have a glyph for every character, each a box naming its Unicode block: no more readable than escapes.
_PLACEHOLDERS = ("Last Resort",)


class Picture(NamedTuple):
    """A PNG as a data URI, with its size in pixels (the page sizes its figure to it)."""

    uri: str
    width: int
    height: int


class PlotNames(NamedTuple):
    """Names as a plot can draw them, and the font families (first choice first) to draw them in."""

    names: list[str]
    families: list[str]


def plot_names(names: Sequence[str]) -> PlotNames:
    """Class names a plot draws as they are when some installed font has their glyphs, else escaped.

    Line breaks and other control characters are always escaped (`a\\rb`), and `$` so it never
    starts mathematics; bytes of a non-UTF-8 name show as U+FFFD.

    Args:
        names: the class names.

    Returns:
        The names to draw and the families to draw them in.
    """
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties())
    families = [font_manager.get_font(default).family_name]
    shown = [_visible(name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")) for name in names]
    missing = frozenset(ord(c) for name in shown for c in name) - _charmap(default)
    if missing:
        fallback = _covering(missing)
        if fallback is None:
            shown = ["".join(_escaped(c) if ord(c) in missing else c for c in name) for name in shown]
        else:
            families.append(fallback)
    return PlotNames(shown, families)


def _visible(name: str) -> str:
    return "".join(_escaped(c) if unicodedata.category(c) == "Cc" else c for c in name).replace("$", r"\$")


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


@functools.cache
def _covering(chars: frozenset[int]) -> str | None:
    """The family of an installed font that draws every one of `chars`, if any (each font read once per process)."""
    from matplotlib import font_manager

    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith(_PLACEHOLDERS):
            continue
        try:
            if chars <= _charmap(entry.fname):
                return entry.name
        except (OSError, RuntimeError):
            continue  # a font file FreeType cannot read
    return None


def confusion_png(record: dict[str, Any]) -> Picture:
    """The run's confusion matrix on its test images: rows the true classes, columns the predicted ones.

    Args:
        record: a run record.

    Returns:
        The picture.
    """
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it was
    from sklearn.metrics import ConfusionMatrixDisplay

    drawn = plot_names(record["classes"])
    size = 2.5 + 0.45 * len(drawn.names)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(record["confusion_matrix"]), display_labels=drawn.names).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation="vertical"
    )
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        label.set_fontfamily(drawn.families)
    return picture(fig)


def reliability_png(record: dict[str, Any]) -> Picture | None:
    """Accuracy against top-1 probability in the ECE's bins, above the number of test images in each bin.

    Bars sit on their bins (never on each other); on the diagonal, probabilities can be taken at
    their word. The axis starts at the lowest top-1 probability possible with the run's classes
    (0.5 for two), so no half of the diagram is always empty.

    Args:
        record: a run record.

    Returns:
        The picture; None when the run recorded no probabilities.
    """
    from matplotlib.figure import Figure

    predictions = record["test_predictions"]
    if not predictions or any(p.get("probability") is None for p in predictions):
        return None
    which = confidence_bins(np.array([p["probability"] for p in predictions], dtype=np.float64))
    right = np.array([p["predicted"] == p["label"] for p in predictions], dtype=np.float64)
    counts = np.bincount(which, minlength=ECE_BINS)
    filled = np.flatnonzero(counts)
    centres = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    low = math.floor(ECE_BINS / len(record["classes"])) / ECE_BINS
    fig = Figure(figsize=(4.2, 4.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    accuracy = np.bincount(which, weights=right, minlength=ECE_BINS)[filled] / counts[filled]
    top.bar(centres[filled], accuracy, width=1 / ECE_BINS, color=_BARS, edgecolor="white", label="accuracy in bin")
    top.plot([low, 1], [low, 1], color=_DIAGONAL, linestyle="--", linewidth=1, label="calibrated")
    top.set(ylim=(0, 1), ylabel="accuracy")
    bottom.bar(centres[filled], counts[filled], width=1 / ECE_BINS, color=_COUNTS, edgecolor="white", label="images")
    bottom.set(xlim=(low, 1), xlabel="top-1 probability", ylabel="images")
    fig.legend(loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return picture(fig)


def picture(fig) -> Picture:
    """A matplotlib figure as an inline PNG, cut to the box around everything it draws; the figure is closed.

    Args:
        fig: the figure.

    Returns:
        The PNG as a data URI, with its size.
    """
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1, facecolor="white")
    plt.close(fig)  # pyplot keeps every figure it made until closed: a long-lived process would hold them all
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        width, height = im.size
    return Picture("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), width, height)
