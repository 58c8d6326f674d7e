"""The `cnncodes` command: a thin Typer layer over the library API.

Every command calls one library function and only formats its result. Errors a user can
fix (`CnnCodesError`) become one red line on stderr and exit code 2; Ctrl-C says how to
resume and exits 130.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .backbones import POOLINGS, REGISTRY, get_backbone
from .choices import KINDS, NORMALIZERS, SMALL_CNN
from .errors import CnnCodesError
from .evaluate import load_records
from .ingest import RESIZE_MODES
from .progress import console as err_console
from .quantize import DEFAULT_CALIBRATION
from .report import FORMATS, html_report, rank, render, rich_table
from .runtime import RUNTIMES
from .split import DEFAULT_DUP_THRESHOLD

app = typer.Typer(
    help="Image classification with little data: CNN codes from frozen ImageNet networks, "
    "linear models and SVMs on them, compared with fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()

BackboneName = Enum("BackboneName", {name: name for name in REGISTRY}, type=str)
TrainableName = Enum("TrainableName", {name: name for name in (*REGISTRY, SMALL_CNN)}, type=str)
Pooling = Enum("Pooling", {name: name for name in POOLINGS}, type=str)
Resize = Enum("Resize", {name: name for name in RESIZE_MODES}, type=str)
Runtime = Enum("Runtime", {name: name for name in RUNTIMES}, type=str)


# Parameters several commands share, declared once (Typer reads the Annotated metadata).
DataArg = Annotated[Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV with path,label columns.")]
WeightsOpt = Annotated[str, typer.Option(help="imagenet, none (untrained), or a .h5 weights file.")]
ResizeOpt = Annotated[Resize, typer.Option(help="crop: centre square; squash: ignore aspect ratio; pad: white borders.")]
RuntimeOpt = Annotated[Runtime, typer.Option(help="Forward pass on ONNX Runtime (fast) or Keras.")]


@contextmanager
def user_errors(resume_hint: str = "nothing was written.") -> Iterator[None]:
    """CnnCodesError and OSError become one red line and exit 2; Ctrl-C exits 130."""
    try:
        yield
    except CnnCodesError as e:
        err_console.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as e:  # unwritable --out, a file where a folder should be, a full disk…
        err_console.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print(f"Interrupted: {resume_hint}")
        raise typer.Exit(130) from None


@app.command()
def extract(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Features folder to write (created if missing).")],
    backbone: Annotated[BackboneName, typer.Option(help="Frozen ImageNet network.")] = "mobilenetv2",
    layer: Annotated[Optional[str], typer.Option(help="Layer whose output is the code (default: the last convolutional block).")] = None,
    pooling: Annotated[Pooling, typer.Option(help="How a feature map becomes a vector.")] = "avg",
    weights: WeightsOpt = "imagenet",
    image_size: Annotated[Optional[int], typer.Option(min=1, help="Square input size in pixels (default: the backbone's).")] = None,
    resize: ResizeOpt = "crop",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Seed of the split's hash.")] = 0,
    dup_threshold: Annotated[int, typer.Option(help="Max pHash bit distance for two images to count as duplicates (-1: off).")] = DEFAULT_DUP_THRESHOLD,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding threads (default: one per core).")] = None,
    runtime: RuntimeOpt = "onnx",
    flip: Annotated[bool, typer.Option("--flip", help="Average each code with its mirror image's: twice the forward passes; not for classes that left and right tell apart.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    precision: Annotated[Literal["fp32", "int8"], typer.Option(help="int8: a quantized ONNX model, faster on a CPU; its agreement with fp32 codes is measured and recorded.")] = "fp32",
    calibration: Annotated[int, typer.Option(min=1, help="Train images that calibrate the int8 model (never val or test images).")] = DEFAULT_CALIBRATION,
) -> None:
    """Turn every image into a CNN code: features.npy, labels.npy, split.csv, rejected.csv, meta.json."""
    from .extract import extract as run_extract

    with user_errors("finished batches are saved; run the same command again to resume."):
        result = run_extract(
            data, out, backbone=BackboneName(backbone).value, layer=layer, pooling=Pooling(pooling).value,
            weights=weights, image_size=image_size, resize=Resize(resize).value, batch_size=batch_size,
            split=split, seed=seed, dup_threshold=dup_threshold, workers=workers, runtime=Runtime(runtime).value,
            flip=flip, progress=not quiet, precision=precision, calibration=calibration,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]Warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if result.rejected:
        reasons = Counter(reason.split(" (")[0].split(":")[0] for _, reason in result.rejected)
        summary = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
        err_console.print(f"[yellow]Skipped {len(result.rejected)} file(s)[/] ({escape(summary)}): "
                          f"see {escape(str(result.out / 'rejected.csv'))}",
                          highlight=False, soft_wrap=True)
    if quiet:
        return
    state = "up to date, nothing recomputed" if result.up_to_date else (
        f"{result.computed} computed, {result.reused} reused in {result.seconds:.1f} s"
        + (f" ({result.images_per_second:.1f} images/s)" if result.images_per_second else ""))
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    out_console.print(Text(f"{result.n_images} codes of {result.dim} numbers for {len(result.classes)} classes "
                           f"({counts}) in {result.out}: {state}"), soft_wrap=True)


@app.command()
def backbones() -> None:
    """List the networks, their input sizes, default layers and ImageNet weight files."""
    table = Table("backbone", "size", "default layer", "other layers", "preprocessing", "ImageNet weights file")
    for column in table.columns:
        column.overflow = "fold"  # narrow terminals wrap names instead of cutting them
    table.columns[0].no_wrap = True
    for entry in REGISTRY.values():
        table.add_row(entry.name, str(entry.default_size), entry.default_layer,
                      ", ".join(entry.taps[:-1] + entry.top_taps), entry.preprocessing, entry.weights_file)
    out_console.print(table)


@app.command()
def layers(
    backbone: Annotated[BackboneName, typer.Argument(help="Network to list.")],
    image_size: Annotated[Optional[int], typer.Option(min=1, help="Input size the shapes are shown for.")] = None,
) -> None:
    """List every layer name of a backbone with its output shape, for --layer."""
    from .weights import Weights

    with user_errors():
        entry = get_backbone(BackboneName(backbone).value)
        network = entry.build_network(image_size or entry.default_size, entry.default_layer, Weights("none"))
    table = Table("layer", "output shape", "named tap")
    for layer in network.layers:
        table.add_row(layer.name, str(tuple(layer.output.shape[1:])), "yes" if layer.name in entry.taps else "")
    out_console.print(table)


Classifier = Enum("Classifier", {name: name for name in ("all", *KINDS)}, type=str)
Normalize = Enum("Normalize", {name: name for name in NORMALIZERS}, type=str)
Format = Enum("Format", {name: name for name in FORMATS}, type=str)
PredictFormat = Enum("PredictFormat", {name: name for name in ("table", "csv", "json")}, type=str)


@app.command("fit-svm")
def fit_svm(
    features: Annotated[Path, typer.Argument(help="Features folder written by `cnncodes extract`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .joblib bundles and .json run records.")],
    classifier: Annotated[list[Classifier], typer.Option(help="Classifier to fit (repeatable).")] = ["all"],
    normalize: Annotated[Normalize, typer.Option(help="Feature normalisation before the classifier.")] = "standard",
    pca: Annotated[Optional[int], typer.Option(min=1, help="Reduce codes to N principal components first.")] = None,
    cv: Annotated[int, typer.Option(help="Cross-validation folds on train+val; 0 chooses on the val subset.")] = 5,
    class_weight: Annotated[Optional[str], typer.Option(help="'balanced' for imbalanced classes.")] = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel jobs for the search (-1: all cores).")] = -1,
    seed: Annotated[int, typer.Option(help="Seed of the folds.")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Prefix of the run names.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
) -> None:
    """Fit linear SVM, logistic regression, RBF SVM and k-NN on CNN codes; score each once on the test subset."""
    from .classifiers import fit_svm as run_fit

    with user_errors():
        records = run_fit(features, out, classifiers=[Classifier(c).value for c in classifier],
                          normalize=Normalize(normalize).value, pca=pca, cv=cv, class_weight=class_weight,
                          n_jobs=n_jobs, seed=seed, name=name, progress=not quiet)
    if not quiet:
        out_console.print(rich_table(records, title=f"Fitted on {records[0]['n_train']} images, "
                                                    f"scored on {records[0]['n_test']} test images"))
        for record in records:
            chosen = ", ".join(f"{k}={v}" for k, v in record["params"].items() if k in ("C", "gamma", "n_neighbors"))
            out_console.print(Text(f"{record['run']}: {chosen} (cv score {record['cv_score']:.3f}) -> "
                                   f"{out / record['model_file']}"), soft_wrap=True)


@app.command()
def compare(
    models: Annotated[list[Path], typer.Argument(help="Folders of run records (the --out of fit-svm and finetune).")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    html_path: Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report.")] = None,
) -> None:
    """Rank every run on the same test set: accuracy with its 95% interval, balanced accuracy, macro-F1, cost."""
    from .artifacts import write_bytes_atomic

    with user_errors():
        records = rank(load_records(models))
        fmt = Format(format).value
        if fmt == "table":
            text = None
            if output:
                raise CnnCodesError("--output needs --format markdown, csv or json")
        else:
            text = render(records, fmt)
        if html_path:
            write_bytes_atomic(html_path, html_report(records).encode())
    if text is None:
        out_console.print(rich_table(records, title=f"{len(records)} runs, {records[0]['n_test']} test images"))
    elif output:
        write_bytes_atomic(output, text.encode())
    else:
        typer.echo(text, nl=False)
    if html_path:
        err_console.print(Text(f"Report written to {html_path}"), soft_wrap=True)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A .joblib bundle from fit-svm or a .keras model from finetune (with its .json beside it).")],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to list per image.")] = 3,
    format: Annotated[PredictFormat, typer.Option("--format", "-f", help="Output format.")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    weights: Annotated[Optional[str], typer.Option(help="Where the model's weights file is now, if it moved.")] = None,
    runtime: RuntimeOpt = "onnx",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Classify new images with a saved model; unreadable files are reported, not fatal."""
    from .artifacts import write_bytes_atomic
    from .predict import predict as run_predict

    with user_errors():
        results = run_predict(model, images, top_k=top_k, batch_size=batch_size, weights=weights,
                              runtime=Runtime(runtime).value, progress=not quiet)
    fmt = PredictFormat(format).value
    if fmt == "table" and not output:
        table = Table("image", "label", "probability", f"top {top_k}")
        table.columns[0].overflow = "fold"  # paths wrap rather than lose their file name
        for r in results:
            top = ", ".join(f"{t['label']} {100 * t['probability']:.0f}%" for t in r.top_k)
            table.add_row(Text(r.path), Text(r.label) if r.label else Text(r.error, style="red"),
                          f"{r.probability:.3f}" if r.label else "", Text(top))
        out_console.print(table)
    else:
        text = _predictions_text(results, "csv" if fmt == "table" else fmt)
        if output:
            write_bytes_atomic(output, text.encode())
        else:
            typer.echo(text, nl=False)
    failed = sum(1 for r in results if r.error)
    if failed:
        err_console.print(f"[yellow]{failed} of {len(results)} file(s) could not be read[/]", highlight=False)
    if failed == len(results):
        raise typer.Exit(1)


def _predictions_text(results, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([r.to_dict() for r in results], indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label", "probability", "top_k", "error"))
    for r in results:
        top = ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r.top_k)
        writer.writerow((r.path, r.label or "", "" if r.probability is None else f"{r.probability:.6f}", top, r.error or ""))
    return buf.getvalue()


@app.command()
def demo(
    data: Annotated[Optional[Path], typer.Argument(help="Your class-per-folder images (default: scikit-learn's digits).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for features, models and the report.")] = Path("models/demo"),
    backbone: Annotated[BackboneName, typer.Option(help="Frozen ImageNet network.")] = "mobilenetv2",
    image_size: Annotated[Optional[int], typer.Option(min=1, help="Input size (default: 96 for the digits, else the backbone's).")] = None,
) -> None:
    """Run the whole pipeline (extract, fit-svm, finetune, compare, predict) and say what each step does."""
    from .demo import run_demo

    with user_errors():
        run_demo(data, out, BackboneName(backbone).value, image_size)


@app.command()
def finetune(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .keras model and its .json run record.")],
    split_from: Annotated[Optional[Path], typer.Option(help="Features folder (or split.csv) whose split to use.")] = None,
    backbone: Annotated[TrainableName, typer.Option(
        help=f"ImageNet network to fine-tune, or {SMALL_CNN}: a small ConvNet from scratch (with --weights none).")] = "mobilenetv2",
    weights: WeightsOpt = "imagenet",
    image_size: Annotated[Optional[int], typer.Option(min=1, help="Square input size (160 is a fast choice on a CPU).")] = None,
    resize: ResizeOpt = "crop",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    head_epochs: Annotated[int, typer.Option(min=0, help="Epochs of phase 1: the head on the frozen backbone.")] = 5,
    fine_epochs: Annotated[int, typer.Option(min=0, help="Epochs of phase 2: the top block unfrozen (smallcnn: more epochs of its one phase).")] = 5,
    unfreeze: Annotated[Optional[str], typer.Option(help="Unfreeze the layers after this one, or the last N layers.")] = None,
    head_lr: Annotated[float, typer.Option(help="Learning rate of phase 1 (smallcnn: its only one).")] = 1e-3,
    lr: Annotated[float, typer.Option(help="Learning rate of phase 2.")] = 1e-5,
    augment: Annotated[Optional[bool], typer.Option(
        help="Random flips, rotations, zooms and contrast while training (default: on; off with --cache-trunk).",
        show_default=False)] = None,
    cache_trunk: Annotated[bool, typer.Option(
        "--cache-trunk", help="Compute the frozen layers' activations once (kept in OUT/.trunk) and train only the top block "
             "and head on them: several times faster per epoch, no augmentation.")] = False,
    class_weight: Annotated[Optional[str], typer.Option(help="'balanced' for imbalanced classes.")] = None,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without val-accuracy gain before stopping.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the split, shuffling and initialisation.")] = 0,
    name: Annotated[Optional[str], typer.Option(help="Prefix of the run name.")] = None,
    resume: Annotated[bool, typer.Option(help="Go on from the last finished epoch of an interrupted run.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
) -> None:
    """Fine-tune the backbone end to end (head, then the top block) and score it on the same test set."""
    from .finetune import finetune as run_finetune

    with user_errors("finished epochs are saved; add --resume to go on."):
        record = run_finetune(
            data, out, backbone=TrainableName(backbone).value, split_from=split_from, weights=weights,
            image_size=image_size, resize=Resize(resize).value, batch_size=batch_size, head_epochs=head_epochs,
            fine_epochs=fine_epochs, unfreeze=unfreeze, head_lr=head_lr, lr=lr, augment=augment,
            cache_trunk=cache_trunk, class_weight=class_weight, patience=patience, seed=seed, name=name, resume=resume, progress=not quiet)
    if not quiet:
        out_console.print(rich_table([record], title=f"{record['epochs_run']} epochs, {record['n_test']} test images"))
