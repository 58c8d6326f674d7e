"""Who may call the service: an optional API key on every route but the probes, and a CORS allow-list.

The key comes from a file (`--api-key-file`) or the environment (`CNNCODES_API_KEY`), never
from the command line, where `ps` shows it to every user of the machine. Clients send it as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; it is compared in constant time. Probes
(`/healthz`, `/readyz`, the V2 health and model-ready routes), `/metrics` and the page at `/`
stay open: a kubelet or a scraper holds no key, and the page asks its user for one.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.serving.settings import API_KEY_ENV

# The routes (as their patterns) anyone may call: probes, metrics and the page that asks for the key.
OPEN_ROUTES = frozenset(
    {
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/versions/{version}/ready",
    }
)
# The headers a browser page on an allowed origin may send, and those its script may read.
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Inference-Header-Content-Length"]
CORS_EXPOSED_HEADERS = ["WWW-Authenticate", "Retry-After", "Inference-Header-Content-Length"]
_REALM = 'Bearer realm="cnncodes"'


class Unauthorized(Exception):
    """A request without the server's API key: answered 401 with a `WWW-Authenticate` challenge."""

    def __init__(self, reason: str, *, wrong: bool):
        super().__init__(reason)
        self.challenge = f'{_REALM}, error="invalid_token"' if wrong else _REALM


def read_api_key(key_file: str | None) -> str | None:
    """The key clients must send: `key_file`'s contents, else `CNNCODES_API_KEY`, else None (no key).

    Args:
        key_file: a file holding the key on its first line (surrounding whitespace is ignored).

    Returns:
        The key, or None when neither the file nor the variable gives one.

    Raises:
        CnnCodesError: the file cannot be read, or the key is empty or not printable ASCII without spaces.
    """
    if key_file is not None:
        try:
            key, where = Path(key_file).read_text(encoding="utf-8").strip(), key_file
        except (OSError, UnicodeDecodeError) as e:
            raise CnnCodesError(
                f"cannot read the API key file {key_file} ({first_line(e)}): give a readable file"
            ) from None
    elif API_KEY_ENV in os.environ:
        key, where = os.environ[API_KEY_ENV].strip(), API_KEY_ENV
    else:
        return None
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise CnnCodesError(
            f"the API key in {where} is empty or holds spaces or non-ASCII characters: "
            "use a random token such as `openssl rand -hex 32` prints"
        )
    return key


def require_api_key(key: str) -> Callable[[Request], Awaitable[None]]:
    """The app-wide dependency refusing a request to a closed route unless it carries `key`.

    Args:
        key: the server's API key.

    Returns:
        A FastAPI dependency; it raises `Unauthorized`, which `add_security` answers.
    """
    expected = key.encode()

    async def check(request: Request) -> None:
        if getattr(request.scope.get("route"), "path", None) in OPEN_ROUTES:
            return
        sent = _sent_key(request)
        if sent is None:
            raise Unauthorized(
                "this server needs an API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                wrong=False,
            )
        if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), expected):
            raise Unauthorized("wrong API key: send the key the server was started with", wrong=True)

    return check


def _sent_key(request: Request) -> str | None:
    """The key a request carries in `X-API-Key` or as a bearer token, if any."""
    if "x-api-key" in request.headers:
        return request.headers["x-api-key"].strip()
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def add_security(app: FastAPI, *, cors_origins: Sequence[str]) -> None:
    """Answer `Unauthorized` as 401 (V2 routes in their `{"error"}` form), and allow `cors_origins`' pages in.

    Call it last, after every other middleware: CORS must answer a browser's preflight, which
    carries no key, before anything else sees it, and put its headers on every answer, a 401 included.

    Args:
        app: the service.
        cors_origins: the origins (`https://host[:port]`, or `*`) whose pages may call the service; none: no CORS.

    Raises:
        CnnCodesError: an origin that is not a scheme, a host and maybe a port.
    """
    app.add_exception_handler(Unauthorized, _unauthorized)
    if not cors_origins:
        return
    for origin in cors_origins:
        check_origin(origin)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(cors_origins),
        allow_methods=["GET", "HEAD", "POST"],
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        max_age=600,
    )


def check_origin(origin: str) -> None:
    """Refuse a `--cors-origin` a browser never sends (a path, a trailing slash, no scheme): it would match nothing.

    Args:
        origin: `*` or `scheme://host[:port]`.

    Raises:
        CnnCodesError: any other form.
    """
    if origin == "*":
        return
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or origin != f"{parts.scheme}://{parts.netloc}":
        raise CnnCodesError(
            f"--cors-origin {origin!r} is not an origin: give a scheme, a host and maybe a port, "
            "such as https://example.org or http://localhost:3000 (no path, no trailing slash)"
        )


async def _unauthorized(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Unauthorized)
    key = "error" if request.url.path.startswith("/v2") else "detail"
    return JSONResponse({key: str(exc)}, status_code=401, headers={"WWW-Authenticate": exc.challenge})
