"""The `cnncodes` command: a thin Typer layer over the library API.

Every command calls one library function and only formats its result. Errors a user can
fix (`CnnCodesError`) become one red line on stderr and exit code 2; Ctrl-C says how to
resume and exits 130.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cnncodes.core.choices import (
    KINDS,
    MAX_EXACT,
    SERVE_BATCH_WAIT_MS,
    SERVE_MAX_BATCH,
    SERVE_MAX_BYTES,
    SERVE_MAX_PIXELS,
    SMALL_CNN,
    EngineName,
    Normalize,
)
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.progress import console as err_console
from cnncodes.core.tflogs import VERBOSE_ENV
from cnncodes.data.ingest import Resize
from cnncodes.data.split import DEFAULT_DUP_THRESHOLD, DEFAULT_FRACTIONS
from cnncodes.nets.backbones import DEFAULT_BACKBONE, REGISTRY, Pooling, get_backbone
from cnncodes.runs.report import Format, html_report, predictions_table, rank, render, render_predictions, rich_table
from cnncodes.runs.report import compare as run_compare
from cnncodes.runtime.quantize import DEFAULT_CALIBRATION, Precision
from cnncodes.runtime.runners import Runtime

app = typer.Typer(
    help="Image classification with little data: CNN codes from frozen ImageNet networks, "
    "linear models and SVMs on them, compared with fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()


def _show_version(asked: bool) -> None:
    if asked:
        from cnncodes import __version__

        typer.echo(f"cnncodes {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show TensorFlow's native log lines.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Options of every command; file names print as the bytes they are, UTF-8 or not."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")


# Backbone choices come from the registry, its one source; type checkers see plain strings.
if TYPE_CHECKING:
    from cnncodes.codes.extract import ExtractResult

    BackboneName: TypeAlias = str
    TrainableName: TypeAlias = str
else:
    BackboneName = Literal[tuple(REGISTRY)]
    TrainableName = Literal[(*REGISTRY, SMALL_CNN)]
PredictFormat = Literal["table", "csv", "json"]
SPLIT_FRACTIONS = ",".join(map(str, DEFAULT_FRACTIONS))  # --split as the user types it


# Parameters several commands share, declared once (Typer reads the Annotated metadata).
DataArg = Annotated[
    Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV with path,label columns.")
]
WeightsOpt = Annotated[str, typer.Option(help="imagenet, none (untrained), or a .h5 weights file.")]
ClassWeightOpt = Annotated[Literal["balanced"] | None, typer.Option(help="balanced: for imbalanced classes.")]
ResizeOpt = Annotated[
    Resize, typer.Option(help="crop: centre square; squash: ignore aspect ratio; pad: white borders.")
]
OUTPUT_HELP = "Write to this file instead of stdout (as CSV unless --format says otherwise)."
RuntimeOpt = Annotated[Runtime, typer.Option(help="Forward pass on ONNX Runtime (fast) or Keras.")]


@contextmanager
def user_errors(resume_hint: str = "nothing was written.") -> Iterator[None]:
    """CnnCodesError and OSError become one red line and exit 2; Ctrl-C exits 130.

    After Ctrl-C, what the library noted on the interrupt (what it had saved) replaces `resume_hint`.
    """
    try:
        yield
    except (CnnCodesError, OSError) as e:  # OSError: an unwritable --out, a file where a folder should be, a full disk…
        err_console.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as e:
        err_console.print(f"Interrupted: {escape(' '.join(getattr(e, '__notes__', [])) or resume_hint)}")
        raise typer.Exit(130) from None


@app.command()
def extract(
    data: Annotated[
        str,
        typer.Argument(
            help="Folder with one sub-folder per class, a CSV with path,label columns, or "
            "the same in an object store (s3://bucket/prefix)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Features folder to write (created if missing).")],
    backbone: Annotated[BackboneName, typer.Option(help="Frozen ImageNet network.")] = DEFAULT_BACKBONE,
    layer: Annotated[
        str | None, typer.Option(help="Layer whose output is the code (default: the last convolutional block).")
    ] = None,
    pooling: Annotated[Pooling, typer.Option(help="How a feature map becomes a vector.")] = "avg",
    weights: WeightsOpt = "imagenet",
    image_size: Annotated[
        str | None,
        typer.Option(
            help="Square input size in pixels; several, e.g. 224,288,384, average the codes of each (one "
            "forward pass per size). Default: the backbone's (`cnncodes backbones`)."
        ),
    ] = None,
    resize: ResizeOpt = "crop",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = SPLIT_FRACTIONS,
    seed: Annotated[int, typer.Option(help="Seed of the split's hash.")] = 0,
    dup_threshold: Annotated[
        int, typer.Option(help="Max pHash bit distance (0-16) for two images to count as duplicates (-1: off).")
    ] = DEFAULT_DUP_THRESHOLD,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Decoding threads, or Ray actors with --engine ray (default: one per core)."),
    ] = None,
    runtime: RuntimeOpt = "onnx",
    flip: Annotated[
        bool,
        typer.Option(
            "--flip",
            help="Average each code with its mirror image's: twice the forward "
            "passes; not for classes that left and right tell apart.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    engine: Annotated[
        EngineName,
        typer.Option(  # help is rich markup: "\[" keeps the extra's brackets
            help="Where checking and forward passes run: this machine, "
            "or a Ray cluster (pip install 'cnncodes\\[ray]')."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join with --engine ray (default: $RAY_ADDRESS, else one started on this "
            "machine by `ray start`, else a new local one)."
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help="int8: a quantized ONNX model, faster on a CPU; "
            "its agreement with fp32 codes is measured and "
            "recorded."
        ),
    ] = "fp32",
    calibration: Annotated[
        int, typer.Option(min=1, help="Train images that calibrate the int8 model (never val or test images).")
    ] = DEFAULT_CALIBRATION,
) -> None:
    """Turn every image into a CNN code: features.npy, labels.npy, groups.npy, split.csv, rejected.csv, meta.json."""
    from cnncodes.codes.extract import REJECTED_FILE, skipped_summary
    from cnncodes.codes.extract import extract as run_extract

    with user_errors("finished batches are saved; run the same command again to resume."):
        result = run_extract(
            data,
            out,
            backbone=backbone,
            layer=layer,
            pooling=pooling,
            weights=weights,
            image_size=image_size,
            resize=resize,
            batch_size=batch_size,
            split=split,
            seed=seed,
            dup_threshold=dup_threshold,
            workers=workers,
            runtime=runtime,
            flip=flip,
            progress=not quiet,
            engine=engine,
            address=address,
            precision=precision,
            calibration=calibration,
        )
    skipped = [skipped_summary(result.rejected, result.out / REJECTED_FILE)] if result.rejected else []
    for warning in result.warnings + skipped:
        err_console.print(f"[yellow]Warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if quiet:
        return
    state = _extract_state(result)
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    out_console.print(
        Text(
            f"{result.n_images} codes of {result.dim} numbers for {len(result.classes)} classes "
            f"({counts}) in {result.out}: {state}"
        ),
        soft_wrap=True,
    )


@app.command()
def backbones() -> None:
    """List the networks, the input sizes `extract` averages codes over, default layers and ImageNet weight files."""
    table = Table("backbone", "sizes", "default layer", "other layers", "preprocessing", "ImageNet weights file")
    for column in table.columns:
        column.overflow = "fold"  # narrow terminals wrap names instead of cutting them
    table.columns[0].no_wrap = table.columns[1].no_wrap = True
    for entry in REGISTRY.values():
        table.add_row(
            entry.name,
            ",".join(map(str, entry.default_sizes("avg", entry.default_layer))),
            entry.default_layer,
            ", ".join(entry.taps[:-1] + entry.top_taps),
            entry.preprocessing,
            entry.weights_file,
        )
    out_console.print(table)


def _extract_state(result: ExtractResult) -> str:
    """What the run did; its time is the features' whole extraction, earlier runs included when rows were reused."""
    if result.up_to_date:
        return "up to date, nothing recomputed"
    notes = [f"{result.seconds:.1f} s of extraction, earlier runs included"] if result.reused else []
    if result.images_per_second:
        notes.append(f"{result.images_per_second:.1f} images/s while computing codes")
    timing = "" if result.reused else f" in {result.seconds:.1f} s"
    return f"{result.computed} computed, {result.reused} reused{timing}" + (f" ({'; '.join(notes)})" if notes else "")


@app.command()
def layers(
    backbone: Annotated[BackboneName, typer.Argument(help="Network to list.")],
    image_size: Annotated[int | None, typer.Option(min=1, help="Input size the shapes are shown for.")] = None,
) -> None:
    """List every layer name of a backbone with its output shape, for --layer.

    At its default size the classifier top's layers (VGG's fc1 and fc2) are listed too.
    """
    from cnncodes.nets.weights import Weights

    with user_errors():
        entry = get_backbone(backbone)
        size = image_size or entry.default_size
        top = bool(entry.top_taps) and size == entry.default_size
        network = entry.build_network(size, entry.top_taps[-1] if top else entry.default_layer, Weights("none"))
    table = Table("layer", "output shape", "named tap")
    named = entry.taps + entry.top_taps
    for layer in network.layers:
        table.add_row(layer.name, str(tuple(layer.output.shape[1:])), "yes" if layer.name in named else "")
    out_console.print(table)


@app.command("fit-svm")
def fit_svm(
    features: Annotated[Path, typer.Argument(help="Features folder written by `cnncodes extract`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .joblib bundles and .json run records.")],
    classifier: Annotated[
        list[str],
        typer.Option(
            help=f"Classifier to fit (repeatable): {', '.join(KINDS)} or all "
            f"(the first four; above {MAX_EXACT:,} training codes logreg and sgd)."
        ),
    ] = ["all"],  # noqa: B006 - Typer's list default
    normalize: Annotated[
        Normalize,
        typer.Option(
            help="Feature normalisation before the classifier; auto: standard, l2 or none, chosen by cross-validation."
        ),
    ] = "auto",
    pca: Annotated[int | None, typer.Option(min=1, help="Reduce codes to N principal components first.")] = None,
    cv: Annotated[int, typer.Option(help="Cross-validation folds on train+val; 0 chooses on the val subset.")] = 5,
    class_weight: ClassWeightOpt = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel jobs for the search (-1: all cores).")] = -1,
    seed: Annotated[int, typer.Option(help="Seed of the folds.")] = 0,
    name: Annotated[str | None, typer.Option(help="Prefix of the run names.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Score on K duplicate-aware splits of the same images "
            "(the features' own, then seeds after it): mean ± sd.",
        ),
    ] = 1,
) -> None:
    """Fit linear SVM, logistic regression, RBF SVM and k-NN (or SGD) on CNN codes; score each on the test subset."""
    from cnncodes.classify.estimator import fit_svm as run_fit

    with user_errors():
        records = run_fit(
            features,
            out,
            classifiers=classifier,
            normalize=normalize,
            pca=pca,
            cv=cv,
            class_weight=class_weight,
            n_jobs=n_jobs,
            seed=seed,
            name=name,
            progress=not quiet,
            repeats=repeats,
        )
    if not quiet:
        out_console.print(
            rich_table(
                rank(records),
                title=f"Fitted on {records[0]['n_train']} images, scored on {records[0]['n_test']} test images",
                width=out_console.width,
            )
        )
        for record in records:
            chosen = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record["params"].items()
                if k in ("normalize", "C", "gamma", "n_neighbors", "loss", "alpha")
            )
            edges = f"; at the edge of its grid: {', '.join(record['grid_edges'])}" if record["grid_edges"] else ""
            out_console.print(
                Text(
                    f"{record['run']}: {chosen} (cv score {record['cv_score']:.3f}{edges}) -> "
                    f"{out / record['model_file']}"
                ),
                soft_wrap=True,
            )


@app.command()
def compare(
    models: Annotated[list[Path], typer.Argument(help="Folders of run records (the --out of fit-svm and finetune).")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help=OUTPUT_HELP)] = None,
    html_path: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report.")] = None,
) -> None:
    """Rank every run on the same test set: accuracy, p-value against the best run, calibration, cost.

    Accuracy has its 95% interval, or mean ± sd over repeated splits; calibration is the ECE and
    the AUROC of the confidence (their means over repeated splits); wider terminals add balanced
    accuracy and macro-F1.
    """
    from cnncodes.core.files import check_file_target, write_bytes_atomic

    with user_errors():
        for target in (output, html_path):
            if target:
                check_file_target(target)
        records = run_compare(models)
        read = [Path(r["record_path"]) for r in records]
        read += [path.with_name(r["model_file"]) for path, r in zip(read, records) if r.get("model_file")]
        for target in (output, html_path):
            if target:
                check_file_target(target, read)
        text = None if format == "table" and not output else render(records, "csv" if format == "table" else format)
        if html_path:
            write_bytes_atomic(html_path, html_report(records).encode())
        if text is not None and output:
            write_bytes_atomic(output, text.encode("utf-8", "surrogateescape"))
    if text is None:
        out_console.print(
            rich_table(
                records,
                title=f"{len(records)} run{'s' * (len(records) != 1)}, {records[0]['n_test']} test images",
                width=out_console.width,
            )
        )
    elif not output:
        typer.echo(text, nl=False)
    if html_path:
        err_console.print(Text(f"Report written to {html_path}"), soft_wrap=True)


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Argument(
            help="A .joblib bundle from fit-svm or a .keras model from finetune (with its .json beside it)."
        ),
    ],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to list per image.")] = 3,
    format: Annotated[PredictFormat, typer.Option("--format", "-f", help="Output format.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help=OUTPUT_HELP)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    weights: Annotated[str | None, typer.Option(help="Where the model's weights file is now, if it moved.")] = None,
    runtime: RuntimeOpt = "onnx",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Classify new images with a saved model; unreadable files are reported, not fatal."""
    from cnncodes.core.files import check_file_target, write_bytes_atomic
    from cnncodes.runs.records import sidecar
    from cnncodes.serving.predict import predict as run_predict

    with user_errors():
        if output:  # never over the model, its record or an image given
            check_file_target(output, [model, sidecar(model), *map(Path, images)])
        results = run_predict(
            model, images, top_k=top_k, batch_size=batch_size, weights=weights, runtime=runtime, progress=not quiet
        )
        if output:  # nor over one a folder or a pattern reached
            check_file_target(output, [Path(r.filename) for r in results])
        text = (
            None
            if format == "table" and not output
            else render_predictions(results, "csv" if format == "table" else format)
        )
        if text is not None and output:
            write_bytes_atomic(output, text.encode("utf-8", "surrogateescape"))
    if text is None:
        out_console.print(predictions_table(results, top_k))
    elif not output:
        typer.echo(text, nl=False)
    failed = sum(1 for r in results if r.error)
    if failed:
        err_console.print(f"[yellow]{failed} of {len(results)} file(s) could not be read[/]", highlight=False)
    if failed == len(results):
        raise typer.Exit(1)


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Argument(help="Your class-per-folder images (default: scikit-learn's digits).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for features, models and the report (default: models/<name of DATA>)."
        ),
    ] = None,
    backbone: Annotated[BackboneName, typer.Option(help="Frozen ImageNet network.")] = DEFAULT_BACKBONE,
    image_size: Annotated[
        int | None, typer.Option(min=1, help="Input size (default: 96 for the digits, else the backbone's).")
    ] = None,
) -> None:
    """Run the whole pipeline (extract, fit-svm, finetune, compare, predict) and say what each step does."""
    from cnncodes.demo import run_demo

    with user_errors():
        run_demo(data, out, backbone, image_size)


@app.command()
def finetune(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .keras model and its .json run record.")],
    split_from: Annotated[Path | None, typer.Option(help="Features folder (or split.csv) whose split to use.")] = None,
    backbone: Annotated[
        TrainableName,
        typer.Option(
            help=f"ImageNet network to fine-tune, or {SMALL_CNN}: a small ConvNet from scratch (with --weights none)."
        ),
    ] = DEFAULT_BACKBONE,
    weights: WeightsOpt = "imagenet",
    image_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Square input size (default: the backbone's, 64 for smallcnn; 160 is a fast choice on a CPU).",
            show_default=False,
        ),
    ] = None,
    resize: ResizeOpt = "crop",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    head_epochs: Annotated[int, typer.Option(min=0, help="Epochs of phase 1: the head on the frozen backbone.")] = 5,
    fine_epochs: Annotated[
        int,
        typer.Option(min=0, help="Epochs of phase 2: the top block unfrozen (smallcnn: more epochs of its one phase)."),
    ] = 5,
    unfreeze: Annotated[
        str | None, typer.Option(help="Unfreeze the layers after this one, or the last N layers.")
    ] = None,
    head_lr: Annotated[float, typer.Option(help="Learning rate of phase 1 (smallcnn: its only one).")] = 1e-3,
    lr: Annotated[float, typer.Option(help="Learning rate of phase 2.")] = 1e-5,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="Dropout before the new softmax layer.")] = 0.2,
    augment: Annotated[
        bool | None,
        typer.Option(
            help="Random flips, rotations, zooms and contrast while training (default: on; off with --cache-trunk).",
            show_default=False,
        ),
    ] = None,
    cache_trunk: Annotated[
        bool,
        typer.Option(
            "--cache-trunk",
            help="Compute the frozen layers' activations once (kept in OUT/.trunk) and train only the top "
            "block and head on them: several times faster per epoch, no augmentation.",
        ),
    ] = False,
    class_weight: ClassWeightOpt = None,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without val-accuracy gain before stopping.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of shuffling and initialisation.")] = 0,
    name: Annotated[str | None, typer.Option(help="Prefix of the run name.")] = None,
    resume: Annotated[bool, typer.Option(help="Go on from the last finished epoch of an interrupted run.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard an interrupted run's checkpoints and start afresh.")] = False,
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Also train and score on K-1 more duplicate-aware splits of the "
            "--split-from features (mean ± sd in the record).",
        ),
    ] = 1,
    split: Annotated[
        str, typer.Option(help="train,val,test fractions of the split made without --split-from.")
    ] = SPLIT_FRACTIONS,
    split_seed: Annotated[
        int, typer.Option(help="Seed of the split made without --split-from (as extract's --seed).")
    ] = 0,
    dup_threshold: Annotated[
        int, typer.Option(help="Duplicate threshold of the split made without --split-from.")
    ] = DEFAULT_DUP_THRESHOLD,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
) -> None:
    """Fine-tune the backbone end to end (head, then the top block) and score it on the same test set."""
    from cnncodes.finetuning.train import finetune as run_finetune
    from cnncodes.finetuning.train import make_spec

    with user_errors("finished epochs are saved; add --resume to go on."):
        spec = make_spec(
            backbone,
            weights=weights,
            image_size=image_size,
            resize=resize,
            batch_size=batch_size,
            head_epochs=head_epochs,
            fine_epochs=fine_epochs,
            unfreeze=unfreeze,
            head_lr=head_lr,
            lr=lr,
            dropout=dropout,
            augment=augment,
            cache_trunk=cache_trunk,
            class_weight=class_weight,
            patience=patience,
            seed=seed,
        )
        record = run_finetune(
            data,
            out,
            spec,
            split_from=split_from,
            split=split,
            split_seed=split_seed,
            dup_threshold=dup_threshold,
            name=name,
            repeats=repeats,
            resume=resume,
            restart=restart,
            progress=not quiet,
        )
    if not quiet:
        title = f"{record['epochs_run']} epochs, {record['n_test']} test images"
        out_console.print(rich_table([record], title=title, width=out_console.width))


ModelArg = Annotated[Path, typer.Argument(help="A .joblib bundle or a .keras model, its .json run record beside it.")]
MovedWeightsOpt = Annotated[str | None, typer.Option(help="Where the model's weights file is now, if it moved.")]


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each gets cores / N threads.")] = 1,
    max_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body (413 before it is read).")
    ] = SERVE_MAX_BYTES,
    max_pixels: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most pixels an upload may decode to (a JPEG at reduced scale); more is a 400. Above Pillow's "
            "decompression-bomb limit (89 million) that limit holds.",
        ),
    ] = SERVE_MAX_PIXELS,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long an image waits for others to share its forward pass.")
    ] = SERVE_BATCH_WAIT_MS,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per forward pass.")] = SERVE_MAX_BATCH,
    weights: MovedWeightsOpt = None,
    runtime: RuntimeOpt = "onnx",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    grace_seconds: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, how long in-flight requests may take to finish.")
    ] = 30.0,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Threads per process (default: cores / workers; in a container, its CPU limit)."),
    ] = None,
) -> None:
    """Serve a saved model over HTTP: POST /predict, GET /healthz, /readyz, /metadata, /metrics."""
    with user_errors():
        from cnncodes.serving.serve import ServeSettings
        from cnncodes.serving.serve import serve as run_serve

        settings = ServeSettings(str(model), weights, runtime, max_bytes, max_pixels, batch_wait_ms, max_batch, threads)
        run_serve(settings, host=host, port=port, workers=workers, access_log=access_log, grace_seconds=grace_seconds)


@app.command()
def prepare(model: ModelArg, weights: MovedWeightsOpt = None) -> None:
    """Verify a model and convert it for ONNX Runtime ahead of time (e.g. in a container build)."""
    from cnncodes.runtime.runners import cache_dir
    from cnncodes.serving.predict import load_predictor

    with user_errors():
        predictor = load_predictor(model, weights)
    out_console.print(
        Text(
            f"prepared {model} ({len(predictor.classes)} classes, {predictor.image_size} px input): "
            f"its runtime model is cached in {cache_dir() / 'onnx'}"
        ),
        soft_wrap=True,
    )
