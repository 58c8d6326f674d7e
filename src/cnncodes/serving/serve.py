"""`cnncodes serve`: a saved model as an HTTP prediction service (FastAPI on uvicorn).

This module runs the server: it checks the address, loads the model before any port opens,
starts uvicorn with one process or several, guards it against idle and slow connections, and
stops cleanly on SIGTERM (readiness 503 at once, then a drain). The app itself is
`cnncodes.serving.app`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import signal
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import write_bytes_atomic, write_json_atomic
from cnncodes.runs.bundle import load_record_for
from cnncodes.runs.records import sidecar
from cnncodes.runtime.runners import CACHE_ENV, cache_dir
from cnncodes.serving.predict import Predictor, load_predictor
from cnncodes.serving.settings import ServeSettings

try:  # the `serve` extra; FastAPI first, so a missing one is named even when the app's module is already loaded
    import h11
    import uvicorn
    from fastapi import FastAPI
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from cnncodes.serving.app import create_app
    from cnncodes.serving.security import check_origin, read_api_key
except ImportError as e:
    raise CnnCodesError(
        f"cnncodes serve needs packages that are not installed ({e.name}): pip install 'cnncodes[serve]'"
    ) from None

# Uvicorn's worker processes read their settings from here (`--workers N` imports the app by name).
SETTINGS_ENV = "CNNCODES_SERVE_SETTINGS"
# What a connection over --max-connections is told before it is closed.
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class GuardedH11Protocol(H11Protocol):
    """Uvicorn's h11 connection, closed when its request is not in within `read_timeout` seconds.

    Uvicorn times a connection out only between requests (`timeout_keep_alive`, armed after a
    response): one that sends nothing, or a request a byte at a time, would hold its socket for
    ever, and enough of them exhaust the file descriptors. Here a deadline runs from the
    connection's start, and again after each response, until the whole request (headers and
    body) has arrived; then the app's `--timeout` bounds the answer. A connection over uvicorn's
    `limit_concurrency` is answered 503 and closed at once, before it is read.

    Args:
        args: uvicorn's arguments for `H11Protocol`.
        read_timeout: seconds a connection has to deliver each whole request.
        kwargs: uvicorn's keyword arguments for `H11Protocol`.
    """

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            transport.write(BUSY)
            transport.close()
            return
        self._start_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        if not self.transport.is_closing():
            self.read_deadline = self.loop.call_later(self.read_timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _deadline_passed(self) -> None:
        self.read_deadline = None
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.transport.close()  # an app reading the body sees the client leave (499)


def app_from_environment() -> FastAPI:
    """The app of one of uvicorn's worker processes (`--workers N`), from `SETTINGS_ENV`.

    Returns:
        The app around the model the settings name.
    """
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    return _drained_on_sigterm(create_app(_load(settings), settings), settings.drain_seconds)


def _drained_on_sigterm(app: FastAPI, seconds: float) -> FastAPI:
    """`app`, whose readiness turns 503 on SIGTERM, `seconds` before uvicorn's graceful shutdown starts.

    Uvicorn's SIGTERM handler closes the listening socket at once, so a load balancer would see
    refused connections instead of a failing readiness probe. Once the app has started (uvicorn's
    handler installed), this one goes first: it drains the batcher, keeps serving for the drain,
    then calls uvicorn's. A second SIGTERM calls it at once.
    """
    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(served: FastAPI) -> AsyncIterator[Any]:
        async with started(served) as state:
            shutdown = signal.getsignal(signal.SIGTERM)
            if callable(shutdown) and threading.current_thread() is threading.main_thread():  # as uvicorn's

                def drain(signum: int, frame: FrameType | None) -> None:
                    again = app.state.batcher.draining
                    app.state.batcher.drain()
                    if again or seconds <= 0:
                        shutdown(signum, frame)
                    else:
                        later = threading.Timer(seconds, shutdown, (signum, frame))
                        later.daemon = True
                        later.start()

                signal.signal(signal.SIGTERM, drain)
            yield state

    app.router.lifespan_context = lifespan
    return app


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
    read_timeout: float = 10.0,
    max_connections: int | None = None,
) -> None:
    """Load the model (errors surface here, before any port opens), then serve until SIGTERM or Ctrl-C.

    Each of the `workers` processes gets `settings.threads` threads, by default `cores / workers`,
    so together they fit the cores instead of each taking all of them. In a container whose CPU
    limit is below the machine's core count, set them to the limit.

    Args:
        settings: the model and how to serve it.
        host: the address to listen on.
        port: the TCP port.
        workers: server processes; more than one serve a private copy of the model file.
        access_log: log every request.
        grace_seconds: on SIGTERM, how long requests under way may take to finish (after `settings.drain_seconds`).
        read_timeout: seconds a connection has to deliver each whole request before it is closed.
        max_connections: open connections (and requests) per process; more are answered 503 and closed
            at once. None: half the process's file-descriptor limit, so sockets never exhaust it.

    Raises:
        CnnCodesError: the address cannot be listened on, the API key file or a CORS origin is unusable, or the
            model cannot be loaded or copied.
    """
    if workers < 1:
        raise CnnCodesError(f"--workers must be at least 1 (got {workers})")
    _check_address(host, port)
    read_api_key(settings.api_key_file)  # a bad key file or origin is said before the model loads
    for origin in settings.cors_origins:
        check_origin(origin)
    threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
    settings = replace(settings, threads=threads)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": access_log,
        "timeout_graceful_shutdown": grace_seconds,
        "loop": "asyncio",  # whose accept loop waits a second after "Too many open files" instead of spinning
        "http": functools.partial(GuardedH11Protocol, read_timeout=read_timeout),
        # An idle connection is closed at the read deadline, not at uvicorn's 5 s, httpx's own keep-alive expiry:
        # a client that reuses a connection as the server closes it gets a reset under load.
        "timeout_keep_alive": read_timeout,
        "limit_concurrency": max_connections or _connection_cap(),
    }
    if workers == 1:
        app = _drained_on_sigterm(create_app(_load(settings), settings), settings.drain_seconds)
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
        uvicorn.run(f"{__name__}:{app_from_environment.__name__}", factory=True, workers=workers, **options)


def _connection_cap() -> int | None:
    """Half the file-descriptor limit: the other half for the model, its libraries and a burst of accepts."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else max(1, soft // 2)


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
