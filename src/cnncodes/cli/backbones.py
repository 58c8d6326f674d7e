"""`cnncodes backbones` and `cnncodes layers`: the networks the registry knows, and the layers of one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import BACKBONES, BackboneName, one_of, out_console, user_errors
from cnncodes.nets.backbones import POOLINGS, REGISTRY, get_backbone
from cnncodes.nets.weights import place_of, search_places


@command("backbones")
def backbones() -> None:
    """List the networks, the input sizes `extract` averages codes over, their layers, and where their ImageNet
    weights files are found here (nothing is downloaded)."""
    table = Table("backbone", "sizes", "layers (default first)", "preprocessing")
    for column in table.columns[:3]:
        column.no_wrap = True  # names stay whole: the preprocessing column wraps instead
    for entry in REGISTRY.values():
        layers = [entry.default_layer, *entry.taps[:-1], *entry.top_taps]
        sizes = ",".join(map(str, entry.default_sizes("avg", entry.default_layer)))
        table.add_row(entry.name, sizes, "\n".join(layers), entry.preprocessing)
    out_console.print(table)
    _print_choices("block3_pool,block5_pool")
    _weights_files()


def _print_choices(example: str) -> None:
    """What `extract` makes of the layers listed, under both tables: several layers, the poolings."""
    out_console.print(
        Text(
            f"extract --layer takes one layer, or several joined by commas (e.g. {example}): their codes, each "
            f"L2-normalised, side by side. --pooling: {', '.join(POOLINGS)} (gem: generalised mean, p=3)."
        )
    )


def _weights_files() -> None:
    """Each ImageNet weights file under the place `--weights imagenet` takes it from, in search order.

    A file name is too long for a table column at 80 characters: one line each, whole.
    """
    places = search_places()
    download = "to download (offline: not available)"
    found: dict[str, list[str]] = {place: [] for place in [*places, download]}
    for entry in REGISTRY.values():
        files = {entry.name: entry.imagenet_file(entry.default_layer)}
        if entry.top_taps:  # its classifier top's layers load another file
            files[f"{entry.name} {','.join(entry.top_taps)}"] = entry.imagenet_file(entry.top_taps[0])
        for label, file in files.items():
            found[place_of(file.name) or download].append(f"{label}: {file.name}")
    for place, lines in found.items():
        if lines:
            heading = download if place == download else f"in {place} ({places[place]})"
            out_console.print(Text(f"ImageNet weights files {heading}:", style="bold"))
            for line in lines:
                out_console.print(Text(line))


@command("layers")
def layers(
    backbone: Annotated[
        BackboneName,
        typer.Argument(parser=one_of(BackboneName), show_choices=False, help=f"Network to list: {BACKBONES}."),
    ],
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
    table.columns[0].no_wrap = True
    named = entry.taps + entry.top_taps
    for layer in network.layers:
        table.add_row(layer.name, str(tuple(layer.output.shape[1:])), "yes" if layer.name in named else "")
    out_console.print(table)
    _print_choices(f"{entry.taps[0]},{entry.default_layer}")
