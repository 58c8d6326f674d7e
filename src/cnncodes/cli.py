"""The `cnncodes` command: a thin Typer layer over the library API.

Every command calls one library function and only formats its result. Errors a user can
fix (`CnnCodesError`) become one red line on stderr and exit code 2; Ctrl-C says how to
resume and exits 130.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .backbones import POOLINGS, REGISTRY, get_backbone
from .errors import CnnCodesError
from .ingest import RESIZE_MODES
from .progress import console as err_console
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
Pooling = Enum("Pooling", {name: name for name in POOLINGS}, type=str)
Resize = Enum("Resize", {name: name for name in RESIZE_MODES}, type=str)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except CnnCodesError as e:
        err_console.print(f"[bold red]Error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted: finished batches are saved; run the same command again to resume.")
        raise typer.Exit(130) from None


@app.command()
def extract(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV with path,label columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Features folder to write (created if missing).")],
    backbone: Annotated[BackboneName, typer.Option(help="Frozen ImageNet network.")] = "mobilenetv2",
    layer: Annotated[Optional[str], typer.Option(help="Layer whose output is the code (default: the last convolutional block).")] = None,
    pooling: Annotated[Pooling, typer.Option(help="How a feature map becomes a vector.")] = "avg",
    weights: Annotated[str, typer.Option(help="imagenet, none (untrained), or a .h5 weights file.")] = "imagenet",
    image_size: Annotated[Optional[int], typer.Option(help="Square input size in pixels (default: the backbone's).")] = None,
    resize: Annotated[Resize, typer.Option(help="crop: centre square; squash: ignore aspect ratio; pad: white borders.")] = "crop",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Seed of the split's hash.")] = 0,
    dup_threshold: Annotated[int, typer.Option(help="Max pHash bit distance for two images to count as duplicates (-1: off).")] = DEFAULT_DUP_THRESHOLD,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding threads (default: one per core).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
) -> None:
    """Turn every image into a CNN code: features.npy, labels.npy, split.csv, rejected.csv, meta.json."""
    from .extract import extract as run_extract

    with user_errors():
        result = run_extract(
            data, out, backbone=BackboneName(backbone).value, layer=layer, pooling=Pooling(pooling).value,
            weights=weights, image_size=image_size, resize=Resize(resize).value, batch_size=batch_size,
            split=split, seed=seed, dup_threshold=dup_threshold, workers=workers, progress=not quiet,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]Warning:[/] {warning}", highlight=False, soft_wrap=True)
    if result.rejected:
        reasons = Counter(reason.split(" (")[0].split(":")[0] for _, reason in result.rejected)
        summary = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
        err_console.print(f"[yellow]Skipped {len(result.rejected)} file(s)[/] ({summary}): see {result.out / 'rejected.csv'}",
                          highlight=False, soft_wrap=True)
    if quiet:
        return
    state = "up to date, nothing recomputed" if result.up_to_date else (
        f"{result.computed} computed, {result.reused} reused in {result.seconds:.1f} s"
        + (f" ({result.images_per_second:.1f} images/s)" if result.images_per_second else ""))
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    out_console.print(f"{result.n_images} codes of {result.dim} numbers for {len(result.classes)} classes "
                      f"({counts}) in {result.out}: {state}", highlight=False, soft_wrap=True)


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
    image_size: Annotated[Optional[int], typer.Option(help="Input size the shapes are shown for.")] = None,
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
