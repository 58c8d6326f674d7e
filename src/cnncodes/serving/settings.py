"""What a server process builds its app from, apart from the model itself."""

from __future__ import annotations

from dataclasses import dataclass

from cnncodes.core.choices import SERVE_BATCH_WAIT_MS, SERVE_MAX_BATCH, SERVE_MAX_BYTES, SERVE_MAX_PIXELS

# The variable holding the API key when no key file is given: a file or the environment, never the command line.
API_KEY_ENV = "CNNCODES_API_KEY"


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """Everything a server process needs to build its app: JSON-able, for uvicorn's worker processes.

    Args:
        model: the .joblib bundle or .keras model to serve (its run record beside it).
        weights: where the model's weights file is now, if it moved.
        runtime: "onnx" or "keras", the forward pass's runtime.
        max_bytes: the largest request body; more is a 413 before it is read.
        max_pixels: the most pixels one upload may decode to; more is a 400.
        max_request_pixels: the most pixels all uploads of one request may decode to; the files past it are
            refused unread (None: eight uploads at `max_pixels`).
        batch_wait_ms: how long an image waits for others to share its forward pass.
        max_batch: the most images in one forward pass.
        max_queue: the most images waiting for a forward pass; more is a 503 with Retry-After at once
            (None: four batches).
        timeout: seconds an image may wait for its prediction; longer is a 504.
        drain_seconds: on SIGTERM, how long the server goes on serving with /readyz answering 503,
            so a load balancer stops sending before the listening socket closes.
        threads: threads of this process, for decoding and for the runtime's operators (None: one per core;
            `serve` gives each of its processes cores / workers).
        model_name: the model's name in the V2 protocol's paths (None: its run's name).
        api_key_file: a file holding the key every route but the probes, /metrics and the page requires
            (None: the `CNNCODES_API_KEY` variable's, or no key). A path, not the key: the settings travel
            to worker processes in their environment.
        cors_origins: the origins whose browser pages may call the service (none: no CORS headers).
        explain: whether POST /explain draws heat maps (it loads the model's feature-map network on first use).
    """

    model: str
    weights: str | None = None
    runtime: str = "onnx"
    max_bytes: int = SERVE_MAX_BYTES
    max_pixels: int = SERVE_MAX_PIXELS
    max_request_pixels: int | None = None
    batch_wait_ms: float = SERVE_BATCH_WAIT_MS
    max_batch: int = SERVE_MAX_BATCH
    max_queue: int | None = None
    timeout: float = 30.0
    drain_seconds: float = 0.0
    threads: int | None = None
    model_name: str | None = None
    api_key_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    explain: bool = True

    @property
    def request_pixels(self) -> int:
        """The most pixels one request's uploads may decode to: `max_request_pixels`, else eight at `max_pixels`."""
        return self.max_request_pixels or 8 * self.max_pixels
