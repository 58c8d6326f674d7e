"""advice.json and advice.html: the measurements, the recommendation with its commands, the suspected labels.

The page is one self-contained file: the depth profile (held-out accuracy per depth and
pooling, with the interval of each one's difference to the default), the learning curve,
and thumbnails of the images whose label looks wrong.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cnncodes.advise.bootstrap import PairedDifference
from cnncodes.advise.recommend import LARGE_PER_CLASS
from cnncodes.core import files as artifacts
from cnncodes.data.remote import joined
from cnncodes.runs.html import STYLE, figure, html_table, readable, thumbnail
from cnncodes.runs.plots import Picture, picture

if TYPE_CHECKING:
    from cnncodes.advise.run import Advice

# Suspected labels shown as thumbnails on the page at most (advice.json lists them all).
PAGE_SUSPECTS = 60
_MARKERS = {"avg": "o", "max": "s", "gem": "^"}


def _interval(d: PairedDifference | None) -> dict[str, float] | None:
    return None if d is None else {"mean": d.mean, "low": d.low, "high": d.high, "confidence": d.confidence}


def advice_dict(advice: Advice, data: str) -> dict[str, Any]:
    """advice.json's content.

    Args:
        advice: the advice.
        data: the dataset as the user named it.

    Returns:
        A JSON-ready dict.
    """
    q = advice.quadrant
    default, best = advice.default, advice.best
    return {
        "data": data,
        "quadrant": {
            "name": q.name,
            "size": q.size,
            "similarity": q.similarity,
            "images_per_class": q.per_class,
            "large_from_images_per_class": LARGE_PER_CLASS,
            "earlier_depth_minus_last_layer": _interval(q.depth_gain),
        },
        "recommendation": {
            "codes": advice.chosen.name,
            "default": default.candidate.name,
            "best_measured": best.candidate.name,
            "best_minus_default": _interval(advice.gains.get(best.candidate.name)),
            "why": recommendation_text(advice),
            "caveat": (
                f"the best of {len(advice.measured)} candidates is chosen on the same images it is measured on, so "
                "its accuracy is optimistic; a setting other than the default is recommended only if its gain's "
                "interval excludes 0, an interval widened for the number of candidates compared (Bonferroni: "
                "all of them hold together with 95% confidence)"
            ),
        },
        "commands": advice.commands,
        "features_with_codes": advice.seeded,
        "measurements": [
            {
                **asdict(m.candidate),
                "name": m.candidate.name,
                "dimensions": m.dimensions,
                "held_out_accuracy": m.accuracy,
                "train_accuracy": m.probe.train_accuracy,
                "scheme": m.probe.scheme,
                "ridge_alpha": m.probe.alpha,
                "logme": m.logme,
                "minus_default": _interval(advice.gains.get(m.candidate.name)),
                "seconds": round(m.seconds, 3),
            }
            for m in advice.measured
        ],
        "learning_curve": advice.curve,
        "label_issues": advice.suspects,
        "cross_class_duplicates": advice.copies,
        "images": advice.images,
        "skipped": [{"path": p, "reason": r, "category": c} for p, r, c in advice.skipped],
        "seconds": advice.seconds,
    }


def recommendation_text(advice: Advice) -> str:
    """One paragraph: the quadrant, the codes recommended and why.

    Args:
        advice: the advice.

    Returns:
        The text.
    """
    best, default = advice.best, advice.default
    q = advice.quadrant
    like = "similar to" if q.similarity == "similar" else "different from"
    text = f"Your data looks {q.size} and {like} ImageNet ({q.per_class} train and val images in the median class). "
    if advice.chosen == default.candidate:
        if best is default:
            return text + f"The default codes ({default.candidate.name}) measured best: keep them."
        d = advice.gains[best.candidate.name]
        return text + (
            f"{best.candidate.name} measured {100 * d.mean:+.1f} points over the default, but its "
            f"{_percent(d.confidence)} interval "
            f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] includes 0 (and the best of {len(advice.measured)} is "
            f"optimistic): keep the default codes ({default.candidate.name})."
        )
    d = advice.gains[advice.chosen.name]
    return text + (
        f"Use {advice.chosen.name}: {100 * d.mean:+.1f} points of held-out accuracy over the default "
        f"({_percent(d.confidence)} interval [{100 * d.low:+.1f}, {100 * d.high:+.1f}]; chosen as the best of "
        f"{len(advice.measured)} on "
        "the same images, so the gain is optimistic: compare's test score will tell)."
    )


def _depth_profile(advice: Advice) -> Picture:
    import matplotlib.pyplot as plt

    backbone = advice.default.candidate.backbone
    base = advice.default.accuracy
    fig, ax = plt.subplots(figsize=(7, 4))
    singles = [m for m in advice.measured if m.candidate.backbone == backbone and len(m.candidate.layers) == 1]
    depths = list(dict.fromkeys(m.candidate.layers[0] for m in singles[1:] + singles[:1]))  # shallow to deep
    for (pooling, sizes), style in _series(singles):
        points = [m for m in singles if (m.candidate.pooling, m.candidate.sizes) == (pooling, sizes)]
        points.sort(key=lambda m: depths.index(m.candidate.layers[0]))  # `measured` lists the default first
        x = [depths.index(m.candidate.layers[0]) + (0.08 if sizes == "kept" else 0.0) for m in points]
        y = [100 * m.accuracy for m in points]
        err = [_error(advice.gains.get(m.candidate.name), m.accuracy, base) for m in points]
        ax.errorbar(x, y, yerr=list(zip(*err)), fmt=style, capsize=3, label=f"{pooling}, sizes {sizes}")
    ax.set_xticks(range(len(depths)), depths, rotation=20, ha="right")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return picture(fig)


def _series(singles: Sequence[Any]) -> list[tuple[tuple[str, str], str]]:
    keys = dict.fromkeys((m.candidate.pooling, m.candidate.sizes) for m in singles)
    return [((p, s), ("-" if s == "mean" else "--") + _MARKERS.get(p, "o")) for p, s in keys]


def _error(d: PairedDifference | None, accuracy: float, base: float) -> tuple[float, float]:
    """The interval of the difference to the default, placed around the candidate's accuracy (0 for the default)."""
    if d is None:
        return 0.0, 0.0
    return max(0.0, 100 * (accuracy - base - d.low)), max(0.0, 100 * (base + d.high - accuracy))


def _curve(points: Sequence[dict]) -> Picture:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    x = [p["images"] for p in points]
    ax.plot(x, [100 * p["held_out_accuracy"] for p in points], "-o", label="held-out")
    ax.plot(x, [100 * p["train_accuracy"] for p in points], "--s", label="train")
    ax.set_xlabel("train and val images used")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return picture(fig)


def _suspects_html(advice: Advice, data: str) -> str:
    shown = advice.suspects[:PAGE_SUSPECTS]
    if not shown:
        return "<p>No image's label looks wrong to the chosen codes' model.</p>"
    figures = []
    for s in shown:
        img = thumbnail(joined(data, s["path"])) or "<div>(image not found)</div>"
        caption = (
            f"{readable(s['path'])} ({s['subset']})<br>given {html.escape(s['given'])} "
            f"({100 * s['probability_given']:.0f}%), likely {html.escape(s['suggested'])} "
            f"({100 * s['probability_suggested']:.0f}%)"
        )
        figures.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
    more = len(advice.suspects) - len(shown)
    tail = f"<p>{more} more in advice.json.</p>" if more > 0 else ""
    return f"<div class='thumbs'>{''.join(figures)}</div>{tail}"


def advice_html(advice: Advice, data: str) -> str:
    """advice.html's content.

    Args:
        advice: the advice.
        data: the dataset as the user named it.

    Returns:
        The page.
    """
    import matplotlib

    matplotlib.use("Agg")
    rows = [
        [
            m.candidate.name,
            m.dimensions,
            f"{100 * m.accuracy:.1f}",
            f"{100 * m.probe.train_accuracy:.1f}",
            f"{m.logme:.3f}",
            gain_text(advice.gains.get(m.candidate.name)),
        ]
        for m in sorted(advice.measured, key=lambda m: -m.accuracy)
    ]
    header = f"minus default [{confidence_label(advice)}]"
    table = html_table(("codes", "numbers", "held-out %", "train %", "LogME", header), rows)
    copies = "".join(f"<li>{html.escape(', '.join(readable(p) for p in group))}</li>" for group in advice.copies)
    sections = [
        f"<p>{html.escape(recommendation_text(advice))}</p>",
        "<h2>Commands</h2><pre style='white-space:pre-wrap'>" + html.escape("\n".join(advice.commands)) + "</pre>",
        "<h2>Depth profile</h2><div class='plots'>"
        + figure(
            _depth_profile(advice),
            "depth profile",
            f"held-out accuracy per depth and pooling; bars: the {confidence_label(advice)} "
            "interval of each one's difference to the default, placed around its accuracy",
        )
        + (figure(_curve(advice.curve), "learning curve", "would more images help?") if advice.curve else "")
        + "</div>",
        f"<h2>Every candidate</h2>{table}",
        f"<h2>Labels that look wrong ({len(advice.suspects)})</h2>{_suspects_html(advice, data)}",
        f"<h2>Near-duplicates with different labels ({len(advice.copies)})</h2><ul>{copies}</ul>",
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>cnncodes advice</title>"
        f"<style>{STYLE}</style></head><body><h1>cnncodes advice: {html.escape(advice.quadrant.name)}</h1>"
        f"{''.join(sections)}</body></html>\n"
    )


def _percent(confidence: float) -> str:
    return f"{100 * confidence:.3g}%"


def confidence_label(advice: Advice) -> str:
    """The coverage of each gain's interval (the same for all), e.g. `99.7%`.

    Args:
        advice: the advice.

    Returns:
        The label.
    """
    return _percent(next((d.confidence for d in advice.gains.values()), 0.95))


def gain_text(d: PairedDifference | None) -> str:
    """A gain over the default in points with its interval, e.g. `+1.4 [+0.3, +2.6]`; `(default)` for None.

    Args:
        d: the difference, or None for the default itself.

    Returns:
        The text.
    """
    if d is None:
        return "(default)"
    return f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def write_advice(advice: Advice, data: str) -> Advice:
    """Write advice.json and advice.html into the advice's folder, each atomically.

    Args:
        advice: the advice.
        data: the dataset as the user named it.

    Returns:
        The advice, written.
    """
    artifacts.write_json_atomic(advice.out / "advice.json", advice_dict(advice, data))
    artifacts.write_bytes_atomic(advice.out / "advice.html", advice_html(advice, data).encode())
    return advice
