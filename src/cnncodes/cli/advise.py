"""`cnncodes advise`: measure the data, pick the strategy, list the labels that look wrong; `--fit` runs the advice."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cnncodes.cli.app import command
from cnncodes.cli.options import (
    SPLIT_FRACTIONS,
    BackboneOpt,
    ResizeOpt,
    RuntimeOpt,
    WeightsOpt,
    out_console,
    user_errors,
)
from cnncodes.core.progress import console as err_console
from cnncodes.data.split import DEFAULT_DUP_THRESHOLD
from cnncodes.nets.backbones import DEFAULT_BACKBONE

if TYPE_CHECKING:
    from cnncodes.advise.run import Advice

# Candidates and suspected labels the summary lists (advice.json and advice.html have them all).
SHOWN = 5


@command("advise")
def advise(
    data: Annotated[
        str, typer.Argument(help="Folder with one sub-folder per class, or a CSV with path,label columns.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for advice.json and advice.html.")],
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    backbones: Annotated[
        str | None, typer.Option(help="Other networks to measure too, e.g. resnet50,vgg16 (a forward pass each).")
    ] = None,
    weights: WeightsOpt = "imagenet",
    image_size: Annotated[
        str | None, typer.Option(help="Input sizes as extract's --image-size (default: the backbone's).")
    ] = None,
    resize: ResizeOpt = "crop",
    split: Annotated[str, typer.Option(help="train,val,test fractions, as extract's.")] = SPLIT_FRACTIONS,
    seed: Annotated[int, typer.Option(help="Seed of the split's hash, as extract's.")] = 0,
    dup_threshold: Annotated[
        int, typer.Option(help="Max pHash bit distance for two images to count as duplicates (-1: off).")
    ] = DEFAULT_DUP_THRESHOLD,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    workers: Annotated[int | None, typer.Option(min=1, help="Decoding threads (default: one per core).")] = None,
    runtime: RuntimeOpt = "onnx",
    max_images: Annotated[
        int, typer.Option(min=4, help="Measure at most this many images (a sample, every class in its share).")
    ] = 10_000,
    fit: Annotated[bool, typer.Option("--fit", help="Run the commands advised, then compare ranks them.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
) -> None:
    """Measure which codes suit the data (depths, poolings, sizes), cs231n's quadrant, and which labels look wrong."""
    from cnncodes.advise.run import advise as run_advise
    from cnncodes.codes.layout import skipped_summary

    with user_errors("the finished forward passes are kept: run the same command again to resume."):
        advice = run_advise(
            data,
            out,
            backbone=backbone,
            backbones=[b for b in (backbones or "").split(",") if b],
            weights=weights,
            image_size=image_size,
            resize=resize,
            split=split,
            seed=seed,
            dup_threshold=dup_threshold,
            batch_size=batch_size,
            workers=workers,
            runtime=runtime,
            max_images=max_images,
            progress=not quiet,
        )
    if advice.skipped:
        line = skipped_summary(advice.skipped, advice.out / "advice.json")
        err_console.print(f"[yellow]Warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if not quiet:
        _summary(advice)
    if fit:
        _run(advice.commands)


def _summary(advice: Advice) -> None:
    from cnncodes.advise.report import confidence_label, gain_text, recommendation_text

    table = Table(title=f"{len(advice.measured)} candidates, {advice.images['measured']} train and val images")
    table.add_column("codes", overflow="fold")  # a name is the setting: folded, never cut
    for column in ("held-out", f"minus default [{confidence_label(advice)}]", "LogME"):
        table.add_column(column, justify="right", no_wrap=True)
    for m in sorted(advice.measured, key=lambda m: -m.accuracy)[:SHOWN]:
        gain = gain_text(advice.gains.get(m.candidate.name))
        table.add_row(escape(m.candidate.name), f"{100 * m.accuracy:.1f}%", gain, f"{m.logme:.3f}")
    out_console.print(table)
    out_console.print(escape(recommendation_text(advice)), highlight=False)
    if not advice.suspects:
        out_console.print("No label looks wrong to the chosen codes' model.", highlight=False)
    else:
        out_console.print(f"{len(advice.suspects)} label(s) look wrong, most suspect first:", highlight=False)
        for s in advice.suspects[:SHOWN]:
            line = (
                f"  {s['path']}: given {s['given']}, likely {s['suggested']} ({100 * s['probability_suggested']:.0f}%)"
            )
            out_console.print(escape(line), highlight=False, soft_wrap=True)
    out_console.print("Next:", highlight=False)
    for line in advice.commands:
        out_console.print(escape(f"  {line}"), highlight=False, soft_wrap=True)
    out_console.print(escape(f"Written: {advice.out / 'advice.json'}, {advice.out / 'advice.html'}"), soft_wrap=True)


def _run(commands: list[str]) -> None:
    """Run each advised command as typed, in this process; the first that fails stops the rest with its exit code."""
    from cnncodes.cli.app import app

    for line in commands:
        err_console.print(escape(f"$ {line}"), highlight=False, soft_wrap=True)
        code = app(shlex.split(line)[1:], standalone_mode=False)
        if code:
            raise typer.Exit(code)
