"""`cnncodes demo`: the whole pipeline on real data in a few minutes, each step said aloud.

With no data it writes the handwritten digits scikit-learn ships (1,797 real 8x8 scans)
as PNG files, so the only download is the ImageNet weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.markup import escape

from cnncodes.classify.fit import fit_classifiers
from cnncodes.codes.extract import extract
from cnncodes.codes.plan import check_out, discover_data
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import read_object, write_bytes_atomic, write_json_atomic
from cnncodes.core.progress import console, say
from cnncodes.finetuning.spec import make_spec
from cnncodes.finetuning.train import finetune
from cnncodes.nets.backbones import DEFAULT_BACKBONE, get_backbone
from cnncodes.runs.html import html_report
from cnncodes.runs.records import load_records
from cnncodes.runs.report import rank, rich_table
from cnncodes.serving.predict import predict

DIGITS_DIR = Path("data/digits")
# The digits are 8x8 scans: 96 px is plenty, and the demo's extract takes seconds.
DIGITS_SIZE = 96
# Written first into the demo's folder: which data the folder belongs to.
DEMO_MARKER = "demo.json"


def write_digits(folder: Path = DIGITS_DIR) -> Path:
    """The scikit-learn digits as `folder/<digit>/<n>.png`, written once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(digits.images):
        return folder
    for n, (image, target) in enumerate(zip(digits.images, digits.target)):
        path = folder / str(target) / f"{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0-16 ink levels become dark ink on white paper, as a scan would look.
        Image.fromarray((255 - image * 255 / 16).astype(np.uint8), mode="L").save(path)
    return folder


def claim_output(out: Path, data: Path, settings: dict[str, Any] | None = None) -> Path:
    """Make `out` the demo's folder for `data` with `settings`, or refuse if it holds anything else.

    An earlier demo of the same data with other settings is refused too: its runs would be
    refused as made from other codes only after the new codes had replaced the old.
    """
    marker, owner = out / DEMO_MARKER, str(data.resolve())
    settings = json.loads(json.dumps(settings))  # as the marker holds them: lists, not tuples
    try:
        claimed = read_object(marker)
    except (OSError, ValueError):
        claimed = {}
    if out.is_dir() and any(out.iterdir()):
        if claimed.get("data") != owner:
            made_for = f"a demo of {claimed['data']}" if claimed.get("data") else "files that are not a demo"
            raise CnnCodesError(f"{out} already holds {made_for}: give the demo of {data} another --out folder")
        if claimed.get("settings") not in (None, settings):  # an older marker does not say
            raise CnnCodesError(
                f"{out} holds a demo of {data} made with {_described(claimed['settings'])}, not "
                f"{_described(settings)}: give another --out folder, or delete {out}"
            )
    write_json_atomic(marker, {"data": owner, "settings": settings})
    return out


def _described(settings: dict[str, Any] | None) -> str:
    return ", ".join(f"{key} {value}" for key, value in (settings or {}).items()) or "other settings"


def run_demo(
    data: Path | None = None,
    out: Path | None = None,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int | None = None,
    examples: int = 8,
    finetune_epochs: tuple[int, int] = (20, 10),
) -> list[dict]:
    """extract -> fit-svm -> finetune -> compare -> predict, saying what each step does; returns the ranked records.

    `out` defaults to `models/<name of the data folder>`; it must be empty or hold an earlier
    demo of the same data and settings (backbone, image size, fine-tune epochs), which is checked
    before anything is written.
    """
    out = out or Path("models") / (data or DIGITS_DIR).resolve().name
    if data is not None:  # a mistyped DATA, or a folder inside it, fails before the folder is claimed
        discover_data(data)
        check_out(data, out)
    size = image_size or (DIGITS_SIZE if data is None else get_backbone(backbone).default_size)
    settings = {"backbone": backbone, "image_size": size, "finetune_epochs": list(finetune_epochs)}
    out = claim_output(out, data or DIGITS_DIR, settings)
    if data is None:
        say("[bold]1/6[/] Writing the handwritten digits that scikit-learn ships to data/digits/ (10 classes)")
        data = write_digits()
    else:
        say(f"[bold]1/6[/] Using your images in {escape(str(data))}")
    features = out / "features"
    say(f"[bold]2/6[/] extract: {backbone} turns every image into a CNN code -> {escape(str(features))}")
    result = extract(data, features, ExtractorSpec.create(backbone=backbone, image_size=size))
    say(f"      {result.n_images} codes of {result.dim} numbers; split {result.counts}")
    say(
        "[bold]3/6[/] fit-svm: linear SVM, logistic regression, RBF SVM and k-NN on the codes "
        "(hyper-parameters by 5-fold cross-validation)"
    )
    fit_classifiers(features, out=out)
    say(
        f"[bold]4/6[/] finetune: {backbone}'s top block and a new head trained on the same split, on the "
        f"frozen layers' activations computed once (--cache-trunk; up to {finetune_epochs[0]} epochs of the head, "
        f"{finetune_epochs[1]} with the top block unfrozen)"
    )
    spec = make_spec(
        backbone,
        image_size=size,
        cache_trunk=True,
        head_epochs=finetune_epochs[0],
        fine_epochs=finetune_epochs[1],
        lr=1e-4,
        patience=5,
    )
    finetune(data, out, spec, split_from=features, resume=True, progress=True)  # an interrupted one goes on
    say(f"[bold]5/6[/] compare: every run scored on the same {result.counts['test']} test images")
    records = rank(load_records([out]))
    console.print(rich_table(records, width=console.width))
    report = out / "report.html"
    write_bytes_atomic(report, html_report(records).encode())
    say(f"      report with confusion matrices and mistakes: {escape(str(report))}")
    best = records[0]
    sample = best["test_predictions"][:: max(1, len(best["test_predictions"]) // examples)][:examples]
    say(f"[bold]6/6[/] predict: the best run ({escape(best['run'])}) on {len(sample)} test images it never saw")
    answers = predict(
        out / best["model_file"], [str(Path(best["dataset"]["data"]) / p["path"]) for p in sample], progress=False
    )
    for truth, answer in zip(sample, answers):
        top = ", ".join(f"{t['label']} {100 * t['probability']:.0f}%" for t in answer.top_k)
        mark = "[green]right[/]" if answer.label == truth["label"] else "[red]wrong[/]"
        say(f"      {escape(truth['path'])}: true {escape(truth['label'])}, top 3: {escape(top)}  {mark}")
    return records
