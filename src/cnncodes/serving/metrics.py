"""The server's Prometheus metrics, and the middleware that counts and times every request."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# What uvicorn cancels a request with when --grace-seconds end (uvicorn/server.py).
UVICORN_SHUTDOWN = "timeout graceful shutdown exceeded"


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own (several apps in one process count apart)."""

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
