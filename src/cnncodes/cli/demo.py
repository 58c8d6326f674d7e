"""`cnncodes demo`: the whole pipeline on a small dataset, each step said as it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnncodes.cli.app import command
from cnncodes.cli.options import BackboneOpt, user_errors
from cnncodes.core.choices import DEMO_DIGITS_PER_CLASS
from cnncodes.nets.backbones import DEFAULT_BACKBONE


@command("demo")
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
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    image_size: Annotated[
        int | None,
        typer.Option(min=1, help="Input size of extract and finetune (default: 96 for the digits, else theirs)."),
    ] = None,
    digits_per_class: Annotated[
        int,
        typer.Option(
            min=2,
            help="Digits of each class written when no DATA is given (all 1,797: 183 or more); "
            "more take longer, mostly in fit-svm.",
        ),
    ] = DEMO_DIGITS_PER_CLASS,
) -> None:
    """Run extract, fit-svm, finetune, compare and predict with their defaults; say each step, difference and file."""
    from cnncodes.demo import run_demo

    with user_errors():
        run_demo(data, out, backbone=backbone, image_size=image_size, digits_per_class=digits_per_class)
