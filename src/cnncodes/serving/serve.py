"""`cnncodes serve`: a saved model as an HTTP prediction service (FastAPI on uvicorn).

This module runs the server: it checks the address, loads the model before any port opens,
starts uvicorn with one process or several, and stops cleanly on SIGTERM. The app itself is
`cnncodes.serving.app`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import write_bytes_atomic, write_json_atomic
from cnncodes.runs.bundle import load_record_for
from cnncodes.runs.records import sidecar
from cnncodes.runtime.runners import CACHE_ENV, cache_dir
from cnncodes.serving.predict import Predictor, load_predictor
from cnncodes.serving.settings import ServeSettings

try:  # the `serve` extra; FastAPI first, so a missing one is named even when the app's module is already loaded
    import uvicorn
    from fastapi import FastAPI

    from cnncodes.serving.app import create_app
except ImportError as e:
    raise CnnCodesError(
        f"cnncodes serve needs packages that are not installed ({e.name}): pip install 'cnncodes[serve]'"
    ) from None

# Uvicorn's worker processes read their settings from here (`--workers N` imports the app by name).
SETTINGS_ENV = "CNNCODES_SERVE_SETTINGS"


def app_from_environment() -> FastAPI:
    """The app of one of uvicorn's worker processes (`--workers N`), from `SETTINGS_ENV`.

    Returns:
        The app around the model the settings name.
    """
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

    Args:
        settings: the model and how to serve it.
        host: the address to listen on.
        port: the TCP port.
        workers: server processes; more than one serve a private copy of the model file.
        access_log: log every request.
        grace_seconds: on SIGTERM, how long requests under way may take to finish.

    Raises:
        CnnCodesError: the address cannot be listened on, or the model cannot be loaded or copied.
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
        uvicorn.run(f"{__name__}:{app_from_environment.__name__}", factory=True, workers=workers, **options)


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
