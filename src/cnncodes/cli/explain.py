"""`cnncodes explain`: heat maps of where a saved model looked, with how faithful they are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnncodes.cli.app import command
from cnncodes.cli.options import MovedWeightsOpt, RuntimeOpt, out_console, say_file_failed, user_errors


@command("explain")
def explain(
    model: Annotated[
        Path,
        typer.Argument(
            help="A .joblib bundle from fit-svm or a .keras model from finetune (with its .json beside it)."
        ),
    ],
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or glob patterns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the maps, pictures, explain.json, index.html.")],
    class_name: Annotated[
        str | None, typer.Option("--class", help="Explain this class for every image, not the predicted one.")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Explain the K most probable classes.")] = 1,
    faithfulness: Annotated[
        bool,
        typer.Option(help="Measure deletion and insertion AUC of each map against a random map (21 passes per image)."),
    ] = True,
    feature_maps: Annotated[
        str | None,
        typer.Option(help="Also draw each image's most active channels at this layer of a bundle's network."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    weights: MovedWeightsOpt = None,
    runtime: RuntimeOpt = "onnx",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Draw where the model found the evidence for its answer on each image; unreadable files are reported."""
    from cnncodes.explain.run import explain as run_explain

    with user_errors():
        run = run_explain(
            model,
            images,
            out,
            class_name=class_name,
            top_k=top_k,
            faithfulness=faithfulness,
            feature_maps=feature_maps,
            batch_size=batch_size,
            weights=weights,
            runtime=runtime,
            progress=not quiet,
        )
    failed = [image for image in run.images if image.error]
    for image in failed:
        say_file_failed(image.filename, image.error)
    if not quiet:
        done = len(run.images) - len(failed)
        out_console.print(  # a path is never broken across lines
            f"{done} image(s) explained by {run.method} into {out} (open {out / 'index.html'})",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        if run.faithfulness:
            f = run.faithfulness
            out_console.print(
                f"faithfulness (mean AUC): deletion {f['deletion']:.3f} vs random {f['random_deletion']:.3f} "
                f"(lower is better), insertion {f['insertion']:.3f} vs random {f['random_insertion']:.3f} "
                "(higher is better)"
            )
    if failed and len(failed) == len(run.images):
        raise typer.Exit(1)
