"""`cnncodes extract`: every image of a dataset turned into a CNN code, and the split made once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import (
    SPLIT_FRACTIONS,
    BackboneOpt,
    ResizeOpt,
    RuntimeOpt,
    WeightsOpt,
    one_of,
    out_console,
    user_errors,
)
from cnncodes.core.choices import EngineName
from cnncodes.core.progress import console as err_console
from cnncodes.data.split import DEFAULT_DUP_THRESHOLD
from cnncodes.nets.backbones import DEFAULT_BACKBONE, Pooling
from cnncodes.runtime.quantize import DEFAULT_CALIBRATION, Precision

if TYPE_CHECKING:
    from cnncodes.codes.extract import ExtractResult


@command("extract")
def extract(
    data: Annotated[
        str,
        typer.Argument(
            help="Folder with one sub-folder per class, a CSV with path,label columns, or "
            "the same in an object store (s3://bucket/prefix)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Features folder to write (created if missing).")],
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    layer: Annotated[
        str | None,
        typer.Option(
            help="Layer whose output is the code (default: the last convolutional block); several, e.g. "
            "block3_pool,block5_pool, join their pooled codes, each L2-normalised, in that order."
        ),
    ] = None,
    pooling: Annotated[
        Pooling,
        typer.Option(
            parser=one_of(Pooling),
            help="How a feature map becomes a vector: mean, maximum, gem (generalised mean, p=3: between the "
            "two) or flatten (one layer only).",
        ),
    ] = "avg",
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
    keep_sizes: Annotated[
        bool,
        typer.Option(
            "--keep-sizes",
            help="With several --image-size, put their codes side by side instead of averaging them (the scale "
            "textures are told apart by is kept; `cnncodes advise` measures whether it helps).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
    engine: Annotated[
        EngineName,
        typer.Option(  # help is rich markup: "\[" keeps the extra's brackets
            parser=one_of(EngineName),
            help="Where checking and forward passes run: this machine, "
            "or a Ray cluster (pip install 'cnncodes\\[ray]').",
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
            parser=one_of(Precision),
            help="int8: a quantized ONNX model, faster on a CPU; its agreement with fp32 codes is measured "
            "and recorded.",
        ),
    ] = "fp32",
    calibration: Annotated[
        int, typer.Option(min=1, help="Train images that calibrate the int8 model (never val or test images).")
    ] = DEFAULT_CALIBRATION,
) -> None:
    """Turn every image into a CNN code: features.npy, labels.npy, groups.npy, split.csv, rejected.csv, meta.json."""
    from cnncodes.codes.extract import extract as run_extract
    from cnncodes.codes.layout import REJECTED_FILE, skipped_summary
    from cnncodes.codes.spec import ExtractorSpec

    with user_errors("finished batches are saved; run the same command again to resume."):
        spec = ExtractorSpec.create(
            backbone=backbone,
            layer=layer,
            pooling=pooling,
            image_size=image_size,
            resize=resize,
            weights=weights,
            flip=flip,
            keep_sizes=keep_sizes,
            precision=precision,
            calibration=calibration,
        )
        result = run_extract(
            data,
            out,
            spec,
            batch_size=batch_size,
            split=split,
            seed=seed,
            dup_threshold=dup_threshold,
            workers=workers,
            runtime=runtime,
            progress=not quiet,
            engine=engine,
            address=address,
        )
    skipped = [skipped_summary(result.rejected, result.out / REJECTED_FILE)] if result.rejected else []
    for warning in result.warnings + skipped:
        err_console.print(f"[yellow]Warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if quiet:
        return
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    out_console.print(
        Text(
            f"{result.n_images} codes of {result.dim} numbers for {len(result.classes)} classes "
            f"({counts}) in {result.out}: {_state(result)}"
        ),
        soft_wrap=True,
    )


def _state(result: ExtractResult) -> str:
    """What the run did; its time is the features' whole extraction, earlier runs included when rows were reused."""
    if result.up_to_date:
        return "up to date, nothing recomputed"
    notes = [f"{result.seconds:.1f} s of extraction, earlier runs included"] if result.reused else []
    if result.images_per_second:
        notes.append(f"{result.images_per_second:.1f} images/s while computing codes")
    timing = "" if result.reused else f" in {result.seconds:.1f} s"
    return f"{result.computed} computed, {result.reused} reused{timing}" + (f" ({'; '.join(notes)})" if notes else "")
