"""The server's Prometheus metrics, and the middleware that counts and times every request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# What uvicorn cancels a request with when --grace-seconds end (uvicorn/server.py).
UVICORN_SHUTDOWN = "timeout graceful shutdown exceeded"


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own (several apps in one process count apart).

    The registry also holds the process, platform and GC collectors a scraper expects
    (`process_resident_memory_bytes`, ...), and `cnncodes_model_info` says which model answers.

    Args:
        model: the labels of `cnncodes_model_info`: name, run, backbone, precision, sha256.
    """

    def __init__(self, *, model: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Gauge(
            "cnncodes_model_info", "The model this server answers with (always 1).", list(model), registry=self.registry
        ).labels(**model).set(1)
        self.in_flight = Gauge("cnncodes_requests_in_flight", "HTTP requests being answered.", registry=self.registry)
        self.queued = Gauge("cnncodes_images_queued", "Images waiting for a forward pass.", registry=self.registry)
        self.forward_seconds = Histogram(
            "cnncodes_forward_seconds",
            "Time of one batch's forward pass, apart from the time its images waited in the queue.",
            registry=self.registry,
        )
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

    def response(self, accept: str | None) -> Response:
        """The registry in the format the scraper's Accept header asks for, negotiated as prometheus_client does.

        Args:
            accept: the request's Accept header, if any.

        Returns:
            The exposition, Prometheus text or OpenMetrics.
        """
        encoder, content_type = choose_encoder(accept or "")
        return Response(encoder(self.registry), headers={"Content-Type": content_type})


def model_labels(*, model: str, record: dict[str, Any]) -> dict[str, str]:
    """The labels of `cnncodes_model_info`: what a dashboard groups the served model's series by.

    Args:
        model: the served model's path.
        record: its run record.

    Returns:
        name (the file's), run, backbone, precision and sha256, "" where the record has none.
    """
    return {
        "name": Path(model).name,
        "run": str(record.get("run") or ""),
        "backbone": str(record.get("backbone") or ""),
        "precision": str(record.get("extractor", {}).get("precision", "fp32")),
        "sha256": str(record.get("model_sha256") or ""),
    }


class MetricsMiddleware:
    """Counts every request by its route's pattern (not its raw path) and final status, and times it.

    A request still running when `--grace-seconds` run out is cancelled by uvicorn: it gets a
    503 saying so, instead of a 500 and a traceback logged after the server said it had finished.

    Args:
        app: the ASGI app it wraps.
        metrics: where it counts.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started, answering = 500, time.perf_counter(), False
        self.metrics.in_flight.inc()

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
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
