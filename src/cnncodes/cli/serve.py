"""`cnncodes serve`: a saved model as an HTTP prediction service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnncodes.cli.app import command
from cnncodes.cli.options import ModelArg, MovedWeightsOpt, RuntimeOpt, user_errors
from cnncodes.core.choices import SERVE_BATCH_WAIT_MS, SERVE_MAX_BATCH, SERVE_MAX_BYTES, SERVE_MAX_PIXELS
from cnncodes.serving.settings import API_KEY_ENV, ServeSettings


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
    max_request_pixels: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most pixels all images of one request may decode to; the files past it get an error unread "
            "(default: eight images at --max-pixels).",
        ),
    ] = None,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0, help="How long an image waits for others to share its forward pass.")
    ] = SERVE_BATCH_WAIT_MS,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per forward pass.")] = SERVE_MAX_BATCH,
    max_queue: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most images waiting for a forward pass; more get 503 with Retry-After at once "
            "(default: four batches).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds an image may wait for its prediction; longer is a 504.")
    ] = 30.0,
    weights: MovedWeightsOpt = None,
    runtime: RuntimeOpt = "onnx",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    grace_seconds: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, how long in-flight requests may take to finish.")
    ] = 30.0,
    drain_seconds: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM, how long to go on serving with /readyz answering 503 before closing the port (in "
            "Kubernetes: the seconds the endpoints take to drop the pod).",
        ),
    ] = 0.0,
    read_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a connection has to send each whole request, and may stay idle between requests; then "
            "it is closed.",
        ),
    ] = 10.0,
    max_connections: Annotated[
        int | None,
        typer.Option(min=1, help="Open connections per process; more get 503 at once (default: half the fd limit)."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Threads per process (default: cores / workers; in a container, its CPU limit)."),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The model's name in the V2 protocol's /v2/models/NAME (default: its run's).")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help=f"A file holding the API key every route but the probes, /metrics and the page at / requires, as "
            f"'Authorization: Bearer KEY' or 'X-API-Key: KEY' (default: ${API_KEY_ENV}, else none). Never the key "
            "itself on the command line, where ps shows it."
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ORIGIN",
            help="An origin (https://host[:port]) whose browser pages may call the server; repeat for more "
            "(default: none, no CORS).",
        ),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(help="POST /explain draws heat maps (the first loads the model's map network: more memory)."),
    ] = True,
) -> None:
    """Serve a saved model over HTTP: POST /predict, GET /healthz, /readyz, /metadata, /metrics; KServe V2 on /v2.

    A page for people at / takes images and shows each one's classes and heat map (POST /explain).
    """
    settings = ServeSettings(
        model=str(model),
        weights=weights,
        runtime=runtime,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_request_pixels=max_request_pixels,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        max_queue=max_queue,
        timeout=timeout,
        drain_seconds=drain_seconds,
        threads=threads,
        model_name=model_name,
        api_key_file=str(api_key_file) if api_key_file else None,
        cors_origins=tuple(cors_origin or ()),
        explain=explain,
    )
    with user_errors():
        from cnncodes.serving.serve import serve as run_serve  # without the `serve` extra: one line saying so

        run_serve(
            settings,
            host=host,
            port=port,
            workers=workers,
            access_log=access_log,
            grace_seconds=grace_seconds,
            read_timeout=read_timeout,
            max_connections=max_connections,
        )
