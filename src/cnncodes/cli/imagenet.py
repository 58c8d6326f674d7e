"""`cnncodes imagenet`: a backbone's own ImageNet top-5 for images, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import BackboneOpt, RuntimeOpt, out_console, say_file_failed, user_errors
from cnncodes.nets.backbones import DEFAULT_BACKBONE


@command("imagenet")
def imagenet(
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    top_k: Annotated[int, typer.Option(min=1, help="How many ImageNet classes to list per image.")] = 5,
    weights: Annotated[
        str, typer.Option(help="imagenet, or a .h5 weights file of the whole network with its classifier top.")
    ] = "imagenet",
    class_index: Annotated[
        Path | None, typer.Option(help="A class index like Keras's imagenet_class_index.json (default: Keras's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    runtime: RuntimeOpt = "onnx",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """What the network itself sees: its own ImageNet top classes for each image (WordNet id, name, probability).

    The whole network runs, its classifier top included, on the centre square at its default size. Its
    weights and Keras's imagenet_class_index.json are found in $CNNCODES_WEIGHTS_DIR or Keras's cache, else
    downloaded.
    """
    from cnncodes.explain.imagenet import imagenet_top

    with user_errors():
        answers = imagenet_top(
            images,
            backbone=backbone,
            top_k=top_k,
            weights=weights,
            class_index=class_index,
            batch_size=batch_size,
            runtime=runtime,
            progress=not quiet,
        )
    if as_json:
        typer.echo(json.dumps([a.to_dict() for a in answers], indent=2))
    elif any(a.top_k for a in answers):
        table = Table("image", "rank", "WordNet id", "class", "probability")
        table.columns[0].overflow = "fold"  # paths wrap rather than lose their file name
        for answer in answers:
            for rank, guess in enumerate(answer.top_k, 1):
                name = Text(answer.filename if rank == 1 else "")
                cells = (str(rank), guess["wnid"], Text(guess["name"]), f"{guess['probability']:.3f}")
                table.add_row(name, *cells, end_section=rank == len(answer.top_k))
        out_console.print(table)
    failed = [a for a in answers if a.error]
    for answer in failed:
        say_file_failed(answer.filename, answer.error)
    if len(failed) == len(answers):
        raise typer.Exit(1)
