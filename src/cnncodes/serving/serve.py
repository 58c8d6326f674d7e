"""`cnncodes serve`: a saved model as an HTTP prediction service (FastAPI on uvicorn).

Uploads go through the same `Predictor` as `cnncodes predict`: the same decoding, the same
pixels, the same probabilities. Images of concurrent requests are gathered into one forward
pass (`MicroBatcher`), so a busy server runs at the batched rate of `predict`; decoding and
the forward pass run on threads, never on the event loop. The server reads no paths from
requests and serves no files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.core.choices import SERVE_BATCH_WAIT_MS, SERVE_MAX_BATCH, SERVE_MAX_BYTES, SERVE_MAX_PIXELS
from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import write_bytes_atomic, write_json_atomic
from cnncodes.data.ingest import BadImage
from cnncodes.runs.bundle import load_record_for
from cnncodes.runs.records import sidecar
from cnncodes.runtime.runners import CACHE_ENV, cache_dir
from cnncodes.serving.predict import Prediction, Predictor, load_predictor

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.datastructures import UploadFile
    from starlette.middleware.body_limit import RequestBodyLimitMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:
    raise CnnCodesError(
        f"cnncodes serve needs packages that are not installed ({e.name}): pip install 'cnncodes[serve]'"
    ) from None

# Uvicorn's worker processes read their settings from here (`--workers N` imports the app by name).
SETTINGS_ENV = "CNNCODES_SERVE_SETTINGS"
# Files one multipart request may carry; more is refused by Starlette's form parser with a 400.
MAX_FILES = 256
UPLOAD_HELP = "send images as multipart/form-data files named 'files', or one image body with an image/* content type"
# The status metrics count a request under when its client left before it was answered (nginx's).
CLIENT_GONE = 499
# What uvicorn cancels a request with when --grace-seconds end (uvicorn/server.py).
UVICORN_SHUTDOWN = "timeout graceful shutdown exceeded"
# uvicorn's own logger: the messages land in the log uvicorn configures, beside its own.
log = logging.getLogger("uvicorn.error")
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
        },
    },
    "responses": {
        "400": {"description": "No file could be read as an image, or a malformed form"},
        "413": {"description": "The body is larger than the server's --max-bytes"},
        "415": {"description": "Neither multipart/form-data nor image/*"},
        "500": {"description": "The forward pass of this request's batch failed"},
        "503": {"description": "The model failed its warm-up, or the server is shutting down"},
    },
}


@dataclass(frozen=True)
class ServeSettings:
    """Everything a server process needs to build its app: JSON-able, for uvicorn's worker processes."""

    model: str
    weights: str | None = None
    runtime: str = "onnx"
    max_bytes: int = SERVE_MAX_BYTES
    max_pixels: int = SERVE_MAX_PIXELS
    batch_wait_ms: float = SERVE_BATCH_WAIT_MS
    max_batch: int = SERVE_MAX_BATCH
    threads: int | None = None


class MicroBatcher:
    """Gathers the images of concurrent requests into one forward pass.

    The first image to arrive after a quiet spell waits up to `wait` seconds for others
    (unless `max_batch` are already queued); images that arrive while a batch runs form the
    next one at once, so under load batches fill without waiting. The forward pass runs on
    one thread of its own, with ONNX Runtime's operator threads under it.

    ONNX Runtime keeps memory per input shape, so a batch runs as pieces whose sizes are
    powers of two (17 = 16 + 1: no padding, six shapes up to 32), and the warm-up runs each
    of them, largest first and then smallest first, which brings memory to its steady state
    before the first request (measured with MobileNetV2 at 224 px: flat afterwards, where
    batches of every size from 1 to 32 grew RSS by about 150 MB under load). `ready` says
    the warm-up is done; `failure` why it failed, after which every image gets a 503 (and
    `/healthz` too, so an orchestrator restarts the process) instead of waiting for ever.
    """

    def __init__(
        self,
        probabilities: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        wait: float,
        on_batch: Callable[[int], None],
    ):
        self.probabilities = probabilities
        self.max_batch = max_batch
        self.wait = wait
        self.on_batch = on_batch
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.arrived = asyncio.Event()
        self.forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnncodes-forward")
        self.task: asyncio.Task | None = None
        self.ready = False
        self.failure: str | None = None

    def start(self, image_size: int) -> None:
        self.task = asyncio.create_task(self._run(image_size))
        self.task.add_done_callback(self._ended)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.forward.shutdown(wait=True)

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """The class probabilities of one image's pixels, computed in some batch."""
        if self.failure:
            raise HTTPException(503, self.failure)
        future = asyncio.get_running_loop().create_future()
        self.pending.append((pixels, future))
        self.arrived.set()
        return await future

    def _forward(self, images: list[np.ndarray]) -> np.ndarray:
        pixels = np.stack(images)
        sizes = _powers_of_two(len(pixels))
        starts = np.cumsum([0, *sizes[:-1]])
        rows = np.concatenate([self.probabilities(pixels[start : start + size]) for start, size in zip(starts, sizes)])
        if len(rows) != len(pixels):
            raise RuntimeError(f"the model gave {len(rows)} rows of probabilities for {len(pixels)} images")
        return rows

    async def _run(self, image_size: int) -> None:
        try:
            await self._warm_up(image_size)
        except Exception as e:
            log.exception("the warm-up failed")
            self._fail_for_good(f"the model failed its warm-up, so this server cannot predict: {first_line(e)}")
            return
        self.ready = True
        while True:
            if not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
                if len(self.pending) < self.max_batch:
                    await asyncio.sleep(self.wait)
            items = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            try:
                self.on_batch(len(items))
                rows = await asyncio.get_running_loop().run_in_executor(
                    self.forward, self._forward, [p for p, _ in items]
                )
            except Exception as e:  # this batch's requests fail; the server goes on
                log.exception("a forward pass failed")
                _fail(items, 500, f"the forward pass failed: {first_line(e)}")
                continue
            for (_, future), row in zip(items, rows):
                if not future.done():  # its client may have gone
                    future.set_result(row)

    async def _warm_up(self, image_size: int) -> None:
        sizes = [1 << b for b in range(self.max_batch.bit_length())]
        for size in sizes[::-1] + sizes:
            warm = np.zeros((size, image_size, image_size, 3), np.uint8)
            await asyncio.get_running_loop().run_in_executor(self.forward, self.probabilities, warm)

    def _ended(self, task: asyncio.Task) -> None:
        """The loop ends by `stop` or after a failed warm-up; anything else is a bug, and ends like the warm-up."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("the micro-batcher stopped", exc_info=error)
        self._fail_for_good(f"the micro-batcher stopped, so this server cannot predict: {first_line(error)}")

    def _fail_for_good(self, reason: str) -> None:
        self.failure = reason
        _fail(list(self.pending), 503, reason)
        self.pending.clear()


def _fail(items: list[tuple[np.ndarray, asyncio.Future]], status: int, detail: str) -> None:
    """Fail each item's request with its own HTTPException; a future whose client has gone is done."""
    for _, future in items:
        if not future.done():
            future.set_exception(HTTPException(status, detail))


def _powers_of_two(n: int) -> list[int]:
    """`n` as a sum of distinct powers of two, largest first."""
    return [1 << b for b in reversed(range(n.bit_length())) if n >> b & 1]


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cnncodes_requests", "HTTP requests by route and status code.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cnncodes_request_seconds", "Time to answer a request, by route.", ["route"], registry=self.registry
        )
        self.batch_size = Histogram(
            "cnncodes_batch_images",
            "Images per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.images = Counter("cnncodes_images_predicted", "Images that got a prediction.", registry=self.registry)
        self.rejected = Counter(
            "cnncodes_images_rejected",
            "Uploads that could not be read, by category.",
            ["category"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts every request by its route's pattern (not its raw path) and final status, and times it.

    A request still running when `--grace-seconds` run out is cancelled by uvicorn: it gets a
    503 saying so, instead of a 500 and a traceback logged after the server said it had finished.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started, answering = 500, time.perf_counter(), False

        async def send_and_note(message: Message) -> None:
            nonlocal status, answering
            if message["type"] == "http.response.start":
                status, answering = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError as cancelled:
            if answering or UVICORN_SHUTDOWN not in str(cancelled):  # any other cancellation stays one
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: the task goes on, to answer
                task.uncancel()
            stopping = JSONResponse({"detail": "the server is shutting down: send the request again"}, 503)
            await stopping(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    """The service: POST /predict, GET /healthz, /readyz, /metadata, /metrics."""
    metrics = Metrics()
    batcher = MicroBatcher(
        predictor.probabilities, settings.max_batch, settings.batch_wait_ms / 1000, metrics.batch_size.observe
    )
    decoders = ThreadPoolExecutor(
        max_workers=settings.threads or os.cpu_count() or 1, thread_name_prefix="cnncodes-decode"
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
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
    )
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    async def answer(filename: str, data: bytes, top_k: int) -> Prediction:
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(
                decoders, predictor.pixels, data, settings.max_pixels
            )
        except BadImage as bad:
            metrics.rejected.labels(bad.category).inc()
            return Prediction(filename, error=str(bad))
        result = predictor.answer(filename, await batcher.submit(pixels), top_k)
        metrics.images.inc()
        return result

    @app.post("/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request, top_k: int = Query(3, ge=1, description="Classes listed per image.")):
        if batcher.failure:  # before reading and decoding a body no forward pass would take
            raise HTTPException(503, batcher.failure)
        try:
            uploads = await _uploads(request)
        except ClientDisconnect:  # nobody to answer: counted, not logged as a server error
            return Response(status_code=CLIENT_GONE)
        results = await asyncio.gather(*(answer(name, data, top_k) for name, data in uploads))
        body = {"predictions": [r.to_dict() for r in results]}
        if all(r.error for r in results):
            return JSONResponse({"detail": "no image in the request could be read", **body}, status_code=400)
        return body

    _add_status_routes(app, batcher, metrics, _metadata(predictor, settings))
    return app


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
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each image of a multipart form (field `files`) or of a raw image body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type.startswith("image/"):
        return [("upload", await request.body())]
    if media_type != "multipart/form-data":
        raise HTTPException(415, f"unsupported content type {media_type or '(none)'}: {UPLOAD_HELP}")
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES) as form:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise HTTPException(400, f"no files in the form: {UPLOAD_HELP}")
        return [(f.filename or f"files[{i}]", await f.read()) for i, f in enumerate(files)]


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
        "limits": {"max_bytes": settings.max_bytes, "max_files": MAX_FILES, "max_pixels": settings.max_pixels},
        "batching": {"max_batch": settings.max_batch, "wait_ms": settings.batch_wait_ms},
    }


def app_from_environment() -> FastAPI:
    """The app of one of uvicorn's worker processes (`--workers N`), from `SETTINGS_ENV`."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    return create_app(_load(settings), settings)


def _load(settings: ServeSettings) -> Predictor:
    return load_predictor(settings.model, settings.weights, settings.runtime, settings.threads)


def serve(
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    access_log: bool = True,
    grace_seconds: float = 30.0,
) -> None:
    """Load the model (errors surface here, before any port opens), then serve until SIGTERM or Ctrl-C.

    Each of the `workers` processes gets `settings.threads` threads, by default `cores / workers`,
    so together they fit the cores instead of each taking all of them. In a container whose CPU
    limit is below the machine's core count, set them to the limit.
    """
    if workers < 1:
        raise CnnCodesError(f"--workers must be at least 1 (got {workers})")
    _check_address(host, port)
    threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
    settings = replace(settings, threads=threads)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": access_log,
        "timeout_graceful_shutdown": grace_seconds,
    }
    if workers == 1:
        app = create_app(_load(settings), settings)
        signal.signal(signal.SIGTERM, _exit_cleanly)
        uvicorn.run(app, **options)
        return
    with _private_folder() as snapshot:
        # Uvicorn restarts a worker that dies, and the new one loads the model again: from this
        # private copy of the verified bytes, so it serves what the others do even if the user's file changed.
        settings = replace(settings, model=str(_snapshot(Path(settings.model), snapshot)))
        _load(settings)  # loads the copy as the workers will, and fills the ONNX cache they load from
        os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
        signal.signal(signal.SIGTERM, _exit_cleanly)
        uvicorn.run("cnncodes.serving.serve:app_from_environment", factory=True, workers=workers, **options)


def _check_address(host: str, port: int) -> None:
    """A port in use or a host that does not resolve is one line now, not uvicorn's exit 3 after the model loaded.

    Bound and released at once, as uvicorn binds it (address reuse on), so a port just freed passes.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # "::1" is IPv6
        socket.create_server((host, port), family=family).close()
    except OSError as e:
        raise CnnCodesError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): give a free --port and a --host of this machine"
        ) from None


def _snapshot(model: Path, folder: Path) -> Path:
    """The model file's verified bytes and its run record, written to `folder` under their own names.

    Not a file: the path itself, for `load_predictor` to say what is wrong with it.
    """
    if not model.is_file():
        return model
    record, data = load_record_for(model)  # an error names the user's file, not the copy
    copy = folder / model.name
    try:
        write_bytes_atomic(copy, data)
        write_json_atomic(sidecar(copy), record)
    except OSError as e:
        raise _unwritable(folder, e) from None
    return copy


@contextmanager
def _private_folder() -> Iterator[Path]:
    """A folder of this server's own in the cache folder (writable wherever the ONNX cache is), removed at exit."""
    parent = cache_dir()
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = tempfile.TemporaryDirectory(prefix=".serve-", dir=parent)
    except OSError as e:
        raise _unwritable(parent, e) from None
    with folder as path:
        yield Path(path)


def _unwritable(folder: Path, error: OSError) -> CnnCodesError:
    return CnnCodesError(
        f"--workers needs a copy of the model in {folder} ({first_line(error)}): set {CACHE_ENV} to a writable folder"
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
