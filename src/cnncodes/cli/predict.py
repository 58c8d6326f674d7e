"""`cnncodes predict`: new images classified by a saved model, as a table, CSV or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cnncodes.cli.app import command
from cnncodes.cli.options import OUTPUT_HELP, MovedWeightsOpt, RuntimeOpt, one_of, out_console, user_errors
from cnncodes.core.progress import console as err_console
from cnncodes.serving.answers import predictions_table, render_predictions

PredictFormat = Literal["table", "csv", "json"]


@command("predict")
def predict(
    model: Annotated[
        Path,
        typer.Argument(
            help="A .joblib bundle from fit-svm or a .keras model from finetune (with its .json beside it)."
        ),
    ],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to list per image.")] = 3,
    format: Annotated[
        PredictFormat, typer.Option("--format", "-f", parser=one_of(PredictFormat), help="Output format.")
    ] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help=OUTPUT_HELP)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    weights: MovedWeightsOpt = None,
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
        table = format == "table" and not output
        text = None if table else render_predictions(results, "csv" if format == "table" else format)
        if text is not None and output:
            write_bytes_atomic(output, text.encode("utf-8", "surrogateescape"))
    if text is None:
        out_console.print(predictions_table(results))
    elif not output:
        typer.echo(text, nl=False)
    failed = sum(1 for r in results if r.error)
    if failed:
        err_console.print(f"[yellow]{failed} of {len(results)} file(s) could not be read[/]", highlight=False)
    if failed == len(results):
        raise typer.Exit(1)
