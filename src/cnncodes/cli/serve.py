"""`cnncodes serve`: a saved model as an HTTP prediction service."""

from __future__ import annotations

from typing import Annotated

import typer

from cnncodes.cli.app import command
from cnncodes.cli.options import ModelArg, MovedWeightsOpt, RuntimeOpt, user_errors
from cnncodes.core.choices import SERVE_BATCH_WAIT_MS, SERVE_MAX_BATCH, SERVE_MAX_BYTES, SERVE_MAX_PIXELS
from cnncodes.serving.settings import ServeSettings


@command("serve")
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
    settings = ServeSettings(
        model=str(model),
        weights=weights,
        runtime=runtime,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        threads=threads,
    )
    with user_errors():
        from cnncodes.serving.serve import serve as run_serve  # without the `serve` extra: one line saying so

        run_serve(settings, host=host, port=port, workers=workers, access_log=access_log, grace_seconds=grace_seconds)
