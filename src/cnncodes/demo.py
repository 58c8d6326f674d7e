"""`cnncodes demo`: the whole pipeline on real data in about 90 s, each step said aloud.

With no data it writes some of the handwritten digits scikit-learn ships (real 8x8 scans)
as PNG files, so the only download is the ImageNet weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.markup import escape
from rich.text import Text

from cnncodes.classify.fit import fit_classifiers
from cnncodes.codes.extract import extract
from cnncodes.codes.layout import REJECTED_FILE, skipped_summary
from cnncodes.codes.plan import check_out, discover_data
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.choices import DEMO_DIGITS_PER_CLASS
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import read_object, write_bytes_atomic, write_json_atomic
from cnncodes.core.progress import console, say, warn
from cnncodes.finetuning.spec import make_spec, spec_params
from cnncodes.finetuning.train import finetune
from cnncodes.nets.backbones import DEFAULT_BACKBONE
from cnncodes.runs.html import html_report
from cnncodes.runs.records import load_records
from cnncodes.runs.report import explain, rank, rich_table
from cnncodes.serving.predict import predict

DIGITS_ROOT = Path("data")
# The digits are 8x8 scans: 96 px is plenty, and the demo's extract takes seconds.
DIGITS_SIZE = 96
# Written first into the demo's folder: which data the folder belongs to.
DEMO_MARKER = "demo.json"
# The fine-tune's settings `finetune_epochs` gives.
EPOCHS = ("head_epochs", "fine_epochs")
# Why the demo departs from a command's default, by setting.
WHY = {
    "cache_trunk": "as in the README's tour, the frozen layers' activations are computed once, several times faster",
    "augment": "activations computed once cannot be augmented (--cache-trunk)",
}
DIGITS_SIZE_WHY = f"the digits are 8x8 scans, and {DIGITS_SIZE} px keeps the demo fast"


def digits_folder(*, per_class: int = DEMO_DIGITS_PER_CLASS, root: Path = DIGITS_ROOT) -> Path:
    """Where `write_digits` puts `per_class` digits of each class: `digits` when that is all of them,
    else `digits-<how many>`, so that a folder always holds one sample."""
    digits, chosen = _digits_sample(per_class)
    return root / ("digits" if len(chosen) == len(digits.target) else f"digits-{len(chosen)}")


def write_digits(*, per_class: int = DEMO_DIGITS_PER_CLASS, root: Path = DIGITS_ROOT) -> Path:
    """`per_class` scikit-learn digits of each class (all of a class with fewer) as PNG files, written once.

    The same digits every time (drawn with a fixed seed), each as `<folder>/<digit>/<n>.png` where n
    is its place among the 1,797: a larger sample holds every digit of a smaller one.

    Args:
        per_class: digits of each class.
        root: the folder of `digits_folder`.

    Returns:
        The folder of the sample.

    Raises:
        CnnCodesError: fewer than 2 per class (cross-validation needs two of each).
    """
    digits, chosen = _digits_sample(per_class)
    folder = digits_folder(per_class=per_class, root=root)
    paths = {folder / str(digits.target[n]) / f"{n:04d}.png": n for n in chosen}
    if folder.is_dir() and set(folder.rglob("*.png")) == set(paths):
        return folder
    for path, n in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0-16 ink levels become dark ink on white paper, as a scan would look.
        Image.fromarray((255 - digits.images[n] * 255 / 16).astype(np.uint8), mode="L").save(path)
    return folder


def _digits_sample(per_class: int) -> tuple[Any, np.ndarray]:
    """scikit-learn's digits, and the places among them of `per_class` digits of each class, in order."""
    from sklearn.datasets import load_digits

    if per_class < 2:
        raise CnnCodesError(f"the demo needs 2 or more digits per class (got {per_class}): e.g. --digits-per-class 50")
    digits = load_digits()
    rng = np.random.default_rng(0)
    drawn = [rng.permutation(np.flatnonzero(digits.target == d))[:per_class] for d in np.unique(digits.target)]
    return digits, np.sort(np.concatenate(drawn))


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
    *,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int | None = None,
    examples: int = 8,
    finetune_epochs: tuple[int, int] | None = None,
    digits_per_class: int = DEMO_DIGITS_PER_CLASS,
) -> list[dict[str, Any]]:
    """The README's commands with their defaults, each step and each artifact said aloud; returns the ranked records.

    extract -> fit-svm -> finetune -> compare -> predict, as `cnncodes COMMAND` runs them with their
    defaults and `backbone`, but for what the output names, one line each: the fine-tune trains on
    cached trunk activations (`--cache-trunk`, as the README's tour does), the digits are seen at
    96 px, and `image_size` and `finetune_epochs` are taken when given. With no `data`, a sample of
    the digits keeps a first run near 90 s; the first line says how many it left out.

    Args:
        data: class-per-folder images (default: `digits_per_class` of scikit-learn's digits, see `write_digits`).
        out: the folder of features, models and report (default: `models/<name of the data folder>`); it must
            be empty or hold an earlier demo of the same data and settings, which is checked before anything
            is written.
        backbone: the ImageNet network of every step.
        image_size: the input size of extract and finetune (default: theirs; 96 px for the digits).
        examples: test images the chosen run predicts.
        finetune_epochs: epochs of the fine-tune's two phases (default: finetune's).
        digits_per_class: digits of each class written when no `data` is given (all of them: 183 or more).

    Returns:
        The run records as `rank` orders them, the chosen run first.

    Raises:
        CnnCodesError: missing data, or an `out` folder that holds something else.
    """
    source = data or digits_folder(per_class=digits_per_class)
    out = out or Path("models") / source.resolve().name
    if data is not None:  # a mistyped DATA, or a folder inside it, fails before the folder is claimed
        discover_data(data)
        check_out(data, out)
    size = image_size or (DIGITS_SIZE if data is None else None)
    codes = ExtractorSpec.create(backbone=backbone, image_size=size)
    epochs: dict[str, Any] = dict(zip(EPOCHS, finetune_epochs or ()))
    tuning = make_spec(backbone, image_size=size, cache_trunk=True, **epochs)
    tuned = spec_params(tuning)
    settings = {"backbone": backbone, "image_size": _sizes(codes), "finetune_epochs": [tuned[k] for k in EPOCHS]}
    out = claim_output(out, source, settings)
    why = {**WHY, "image_size": "as --image-size asks" if image_size else DIGITS_SIZE_WHY}
    data = _data(data, digits_per_class)
    features = out / "features"
    say(f"[bold]2/6[/] extract: {backbone} makes a code of every image: {_command('extract', data, '--out', features)}")
    _differences({"image_size": _sizes(codes)}, {"image_size": _sizes(ExtractorSpec.create(backbone=backbone))}, why)
    n_test = _extract(data, features, codes)
    say(
        "[bold]3/6[/] fit-svm: linear SVM, logistic regression, RBF SVM and k-NN on the codes, their settings "
        f"chosen by cross-validation: {_command('fit-svm', features, '--out', out)}"
    )
    for record in fit_classifiers(features, out=out):
        _saved(out, record, f"cv score {record['cv_score']:.3f}")
    say(
        f"[bold]4/6[/] finetune: {backbone}'s top block and a new head trained on the same split: "
        + _command("finetune", data, "--split-from", features, "--out", out)
    )
    _differences(tuned, spec_params(make_spec(backbone)), why)
    record = finetune(data, out, tuning, split_from=features, resume=True, progress=True)  # an interrupted one goes on
    _saved(out, record, f"validation accuracy {record['val_score']:.3f}")
    return _compare(out, n_test, examples)


def _data(data: Path | None, per_class: int) -> Path:
    """Step 1: the user's images, or the digits written, and what of them the demo leaves out."""
    if data is not None:
        say(f"[bold]1/6[/] Using your images in {escape(str(data))}")
        return data
    digits, chosen = _digits_sample(per_class)
    folder, total = digits_folder(per_class=per_class), len(digits.target)
    if len(chosen) == total:
        say(f"[bold]1/6[/] Writing the {total:,} handwritten digits that scikit-learn ships to {escape(str(folder))}/")
    else:
        say(
            f"[bold]1/6[/] Writing {len(chosen):,} of the {total:,} handwritten digits that scikit-learn ships "
            f"({per_class} of each, drawn at random) to {escape(str(folder))}/; the other {total - len(chosen):,} "
            f"are left out to keep the demo near 90 s: --digits-per-class {max(np.bincount(digits.target))} takes all"
        )
    return write_digits(per_class=per_class)


def _sizes(spec: ExtractorSpec) -> list[int]:
    """The input sizes whose codes are averaged: several, or the one."""
    return spec.scales or [spec.image_size]


def _command(*words: object) -> str:
    """A command line as the user would type it, for the step that runs what it runs."""
    return escape(f"`cnncodes {' '.join(map(str, words))}`")


def _differences(used: dict[str, Any], default: dict[str, Any], why: dict[str, str]) -> None:
    """One line per setting the demo runs with that is not the command's default: the option, the default, why."""
    for name in (n for n in used if used[n] != default.get(n)):
        option = f"--{name.replace('_', '-')}"
        value, was = used[name], default.get(name)
        if isinstance(value, bool):
            shown = f"{option if value else '--no-' + option[2:]} (default {'on' if was else 'off'})"
        else:
            shown = f"{option} {_plain(value)} (default {_plain(was)})"
        say(f"      not the default: {escape(shown)}: {escape(why.get(name, 'as asked'))}")


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _extract(data: Path, features: Path, spec: ExtractorSpec) -> int:
    """`extract`, its warnings said as the command says them, and the split in words; returns the test images."""
    result = extract(data, features, spec)
    for warning in result.warnings:
        warn(warning)
    if result.rejected:
        warn(skipped_summary(result.rejected, result.out / REJECTED_FILE))
    split = ", ".join(f"{n:,} {subset}" for subset, n in result.counts.items())
    say(f"      {result.n_images:,} codes of {result.dim:,} numbers -> {escape(str(features))}")
    say(f"      split: {split} images")
    return result.counts["test"]


def _saved(out: Path, record: dict[str, Any], selection: str) -> None:
    say(f"      {escape(record['run'])} ({selection}) -> {escape(str(out / record['model_file']))}")


def _compare(out: Path, n_test: int, examples: int) -> list[dict[str, Any]]:
    """`compare` with its HTML report, then the chosen run predicts `examples` of the test images."""
    say(
        f"[bold]5/6[/] compare: the runs ranked by CV score, the chosen one first, each scored on the same "
        f"{n_test:,} test images: {_command('compare', out, '--html', out / 'report.html')}"
    )
    records = rank(load_records([out]))
    console.print(rich_table(records, width=console.width))
    console.print(Text(explain(records)))
    report = out / "report.html"
    write_bytes_atomic(report, html_report(records).encode())
    say(f"      report with confusion matrices and the chosen run's mistakes -> {escape(str(report))}")
    chosen = records[0]
    sample = chosen["test_predictions"][:: max(1, len(chosen["test_predictions"]) // examples)][:examples]
    say(f"[bold]6/6[/] predict: the chosen run ({escape(chosen['run'])}) on {len(sample)} test images it never saw")
    answers = predict(
        out / chosen["model_file"], [str(Path(chosen["dataset"]["data"]) / p["path"]) for p in sample], progress=False
    )
    for truth, answer in zip(sample, answers):
        top = ", ".join(f"{t['label']} {100 * t['probability']:.0f}%" for t in answer.top_k)
        mark = "[green]right[/]" if answer.label == truth["label"] else "[red]wrong[/]"
        said = f"true {escape(truth['label'])}, top {len(answer.top_k)}: {escape(top)}"
        say(f"      {escape(truth['path'])}: {said}  {mark}")
    return records
