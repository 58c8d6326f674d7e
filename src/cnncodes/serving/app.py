"""The HTTP service around one loaded model: POST /predict, GET /healthz, /readyz, /metadata, /metrics, and the
Open Inference Protocol's /v2 routes (`serving.v2`); for people, a page at / (`serving.page`) and the heat maps
it shows (POST /explain, `serving.heatmap`); an optional API key and CORS allow-list (`serving.security`).

Uploads go through the same `Predictor` as `cnncodes predict`: the same decoding, the same
pixels, the same probabilities. Images of concurrent requests share forward passes
(`MicroBatcher`); decoding and the forward pass run on threads, never on the event loop.
The service reads no paths from requests and serves no files.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from cnncodes.data.decode import BadImage
from cnncodes.serving.batcher import MicroBatcher
from cnncodes.serving.guards import FairDecoding, PerRequest, ReadRefusedBody, limit_bodies
from cnncodes.serving.heatmap import add_explain_route
from cnncodes.serving.metrics import Metrics, MetricsMiddleware, model_labels
from cnncodes.serving.page import add_page_route
from cnncodes.serving.predict import Prediction, Predictor
from cnncodes.serving.security import add_security, read_api_key, require_api_key
from cnncodes.serving.settings import ServeSettings
from cnncodes.serving.v2 import add_v2_routes

# Files one multipart request may carry; more is refused by Starlette's form parser with a 400.
MAX_FILES = 256
UPLOAD_HELP = (
    "send images as multipart/form-data files named 'files', "
    "or one image body with an image/* or application/octet-stream content type"
)
# A body refused before it was read is still read and dropped, up to this many bytes (or --max-bytes twice) and
# seconds, so a client that sends it whole before reading sees the answer instead of a connection reset.
REFUSED_BODY_BYTES = 8_000_000
REFUSED_BODY_SECONDS = 5.0
# The status metrics count a request under when its client left before it was answered (nginx's).
CLIENT_GONE = 499
# /predict reads its body itself (multipart or raw), so its OpenAPI schema is written out here.
UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "400": {"description": "No file could be read as an image, or a malformed form"},
        "413": {"description": "The body is larger than the server's --max-bytes"},
        "415": {"description": "Neither multipart/form-data, image/* nor application/octet-stream"},
        "500": {"description": "The forward pass of this request's batch failed"},
        "503": {"description": "The model failed its warm-up, the queue is full (Retry-After), or the server stops"},
        "504": {"description": "No prediction within the server's --timeout"},
    },
}


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    """The service: POST /predict and /explain, GET /, /healthz, /readyz, /metadata, /metrics, and V2 under /v2.

    Args:
        predictor: the loaded model.
        settings: the limits, batching and threads the app runs with (its model is named in /metadata).

    Returns:
        The ASGI app; its lifespan warms the model up and starts the micro-batcher.

    Raises:
        CnnCodesError: the API key file cannot be read, or a CORS origin is not one.
    """
    key = read_api_key(settings.api_key_file)
    metrics = Metrics(model=model_labels(model=settings.model, record=predictor.record))
    batcher = MicroBatcher(predictor.probabilities, settings=settings, metrics=metrics)
    workers = settings.threads or os.cpu_count() or 1
    decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnncodes-decode")
    fair = FairDecoding(decoders, workers=workers, request_pixels=settings.request_pixels)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start(predictor.image_size)
        yield
        await batcher.stop()
        decoders.shutdown(wait=True)

    app = FastAPI(
        title="cnncodes",
        summary=f"Predictions of {predictor.record.get('run', settings.model)}",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a redirect's Location would be built from the client's Host header
        dependencies=[Depends(require_api_key(key))] if key else None,
    )
    app.state.batcher = batcher  # `serve` drains it on SIGTERM
    _add_middleware(app, settings, metrics)
    pixels_of, rejected = _decoding(predictor, settings, fair, metrics)
    _add_predict_route(app, predictor, batcher, pixels_of, metrics)
    _add_status_routes(app, batcher, metrics, _finite(_metadata(predictor, settings)))
    name = settings.model_name or str(predictor.record.get("run") or Path(settings.model).stem)
    add_page_route(app, model=name)
    add_explain_route(
        app,
        predictor=predictor,
        settings=settings,
        batcher=batcher,
        threads=decoders,
        read_uploads=_uploads,
        on_rejected=rejected,
        upload_schema=UPLOAD_SCHEMA,
    )
    add_v2_routes(
        app,
        name=name,
        classes=predictor.classes,
        batcher=batcher,
        pixels_of=pixels_of,
        on_images=metrics.images.inc,
        max_images=MAX_FILES,
    )
    return app


def _add_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    """Body limits, per-request pixel budgets, metrics, CORS and security headers, and refused bodies read out."""
    limit_bodies(app, settings.max_bytes)
    app.add_middleware(PerRequest, pixels=settings.request_pixels)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    add_security(app, cors_origins=settings.cors_origins)
    refused_bytes = max(REFUSED_BODY_BYTES, 2 * settings.max_bytes)
    app.add_middleware(ReadRefusedBody, limit=refused_bytes, seconds=REFUSED_BODY_SECONDS)


def _decoding(
    predictor: Predictor, settings: ServeSettings, fair: FairDecoding, metrics: Metrics
) -> tuple[Callable[[bytes], Awaitable[np.ndarray]], Callable[[BadImage], None]]:
    """How every route turns an upload into the model's pixels, and counts the ones it rejects."""

    def rejected(bad: BadImage) -> None:
        metrics.rejected.labels(bad.category).inc()

    async def pixels_of(data: bytes) -> np.ndarray:
        try:
            return await fair.decode(
                functools.partial(predictor.pixels, max_pixels=settings.max_pixels),
                data,
                draft_size=predictor.image_size,
            )
        except BadImage as bad:
            rejected(bad)
            raise

    return pixels_of, rejected


def _add_predict_route(
    app: FastAPI,
    predictor: Predictor,
    batcher: MicroBatcher,
    pixels_of: Callable[[bytes], Awaitable[np.ndarray]],
    metrics: Metrics,
) -> None:
    """POST /predict: every image of a request through the micro-batcher; 400 when none could be read."""

    async def answer(filename: str, data: bytes, top_k: int) -> Prediction:
        try:
            pixels = await pixels_of(data)
        except BadImage as bad:
            return Prediction(filename, error=str(bad))
        result = predictor.answer(filename, await batcher.submit(pixels), top_k)
        metrics.images.inc()
        return result

    @app.post("/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request, top_k: int = Query(3, ge=1, description="Classes listed per image.")):
        batcher.admit()  # before reading and decoding a body no forward pass would take
        try:
            uploads = await _uploads(request)
        except ClientDisconnect:  # nobody to answer: counted, not logged as a server error
            return Response(status_code=CLIENT_GONE)
        results = await asyncio.gather(*(answer(name, data, top_k) for name, data in uploads))
        body = {"predictions": [r.to_dict() for r in results]}
        if all(r.error for r in results):
            return JSONResponse({"detail": "no image in the request could be read", **body}, status_code=400)
        return body


def _add_status_routes(app: FastAPI, batcher: MicroBatcher, metrics: Metrics, info: dict[str, Any]) -> None:
    """What probes and operators ask: /healthz (alive), /readyz (warmed up), /metadata and /metrics."""

    @app.get("/healthz")
    async def healthz():
        if batcher.failure:
            return JSONResponse({"status": "failed", "detail": batcher.failure}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if batcher.ready and not batcher.failure:
            return {"status": "ready"}
        return JSONResponse({"status": "failed" if batcher.failure else "not ready"}, status_code=503)

    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD too, outside the schema (one id each)
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/metadata")
    async def metadata():
        return info

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        return metrics.response(request.headers.get("accept"))


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each image of a multipart form (field `files`) or of a raw image body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        return [("upload", await request.body())]
    if media_type != "multipart/form-data":
        raise HTTPException(415, f"unsupported content type {media_type or '(none)'}: {UPLOAD_HELP}")
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES) as form:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise HTTPException(400, f"no files in the form: {UPLOAD_HELP}")
        return [(f.filename or f"files[{i}]", await f.read()) for i, f in enumerate(files)]


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity in it as None: JSON has neither, and a record may hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _metadata(predictor: Predictor, settings: ServeSettings) -> dict[str, Any]:
    record = predictor.record
    summary = (
        "run",
        "method",
        "backbone",
        "layer",
        "classifier",
        "accuracy",
        "accuracy_ci95",
        "accuracy_mean",  # these two with --repeats: over the splits; `accuracy` is the served model's split
        "accuracy_sd",
        "balanced_accuracy",
        "macro_f1",
        "ece",  # how far the served probabilities are from the accuracy they claim, on the test images
        "confidence_auroc",
        "ece_mean",  # these two with --repeats: over the splits
        "confidence_auroc_mean",
        "n_train",
        "n_test",
        "created",
        "model_sha256",
    )
    return {
        "classes": predictor.classes,
        "backbone": record.get("backbone"),
        "layer": record.get("layer"),
        "precision": record.get("extractor", {}).get("precision", "fp32"),  # int8: a quantized network
        "input_size": predictor.image_size,
        "resize": predictor.resize,
        "threads": settings.threads,
        "run": {key: record.get(key) for key in summary},
        "limits": {
            "max_bytes": settings.max_bytes,
            "max_files": MAX_FILES,
            "max_pixels": settings.max_pixels,
            "max_request_pixels": settings.request_pixels,
        },
        "batching": {"max_batch": settings.max_batch, "wait_ms": settings.batch_wait_ms},
    }
