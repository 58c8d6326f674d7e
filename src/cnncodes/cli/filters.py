"""`cnncodes filters`: the pictures that excite a backbone layer's channels most, in one grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import BACKBONES, BackboneName, WeightsOpt, one_of, out_console, user_errors
from cnncodes.explain.filters import FILTERS, SIZE, STEPS


@command("filters")
def filters(
    backbone: Annotated[
        BackboneName,
        typer.Argument(parser=one_of(BackboneName), show_choices=False, help=f"Network to look into: {BACKBONES}."),
    ],
    layer: Annotated[str, typer.Option(help="Layer whose channels are drawn (`cnncodes layers BACKBONE`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for filters.png and filters.json.")],
    n_filters: Annotated[
        int,
        typer.Option(
            "--filters", min=1, help=f"Channels to draw, at random if the layer has more; the best {FILTERS} are shown."
        ),
    ] = FILTERS,
    size: Annotated[
        int, typer.Option(min=1, help="Picture side in pixels (the classifier top's layers: the backbone's size).")
    ] = SIZE,
    steps: Annotated[int, typer.Option(min=1, help="Gradient ascent steps.")] = STEPS,
    weights: WeightsOpt = "imagenet",
    noise_seed: Annotated[int, typer.Option(help="Picks the channels and the starting noise.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Draw what each channel of a layer responds to: gradient ascent on the input from faint noise, before the
    layer's ReLU if it has one; the best pictures by activation go in an 8 x 8 grid, filters.png, with filters.json."""
    from cnncodes.explain.filters import draw_filters

    with user_errors():
        result = draw_filters(
            backbone=backbone,
            layer=layer,
            out=out,
            filters=n_filters,
            size=size,
            steps=steps,
            weights=weights,
            seed=noise_seed,
            progress=not quiet,
        )
    if not quiet:
        best, worst = result.tiles[0], result.tiles[-1]
        out_console.print(
            Text(
                f"{len(result.tiles)} filters of {result.maximised} in {result.png} and {result.json.name} "
                f"(activation {best.loss:.3g} for filter {best.filter} to {worst.loss:.3g} for filter {worst.filter})"
            ),
            soft_wrap=True,
        )
