"""What keeps one request from taking the server: decoding shared between requests in turn, a budget of decoded
pixels per request, and a refused body read (up to a bound) so its client sees the answer.

Measured before these: one request of 256 PNGs of 3,999² pixels held both decoding threads for 43 s,
and a one-image request sent 1.5 s after it waited 41 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnncodes.data.decode import BadImage, pixels_held

T = TypeVar("T")


class _Budget:
    """The decoded pixels one request has left; its files are charged from the decoding threads."""

    def __init__(self, pixels: int):
        self.total = self.left = pixels
        self.lock = threading.Lock()

    def charge(self, pixels: int) -> None:
        with self.lock:
            if pixels > self.left:
                self.left = -1  # the files after a refused one are refused too, as the reason says
                raise BadImage(
                    f"not decoded: this request's images decode to over {self.total:,} pixels, the server's "
                    "--max-request-pixels: send fewer or smaller images per request",
                    "too large",
                )
            self.left -= pixels


# The budget of the request being served; `PerRequest` sets it, the tasks of the request inherit it.
_REQUEST: ContextVar[_Budget | None] = ContextVar("cnncodes_request", default=None)


class FairDecoding:
    """The decoding threads, shared between requests in turn, each request within a budget of decoded pixels.

    Each request's files wait in a queue of their own; a thread that frees up takes the oldest
    file of the next request in turn, so a request of hundreds of images delays one sent after
    it by one file's decode, not by all of them. Before a file is decoded its header's pixels
    (`pixels_held`) are charged to its request's budget; past it, the file and those after it are
    refused unread (`BadImage`, "too large"). A request is what `PerRequest` marks as one.

    Args:
        threads: where the decoding runs.
        workers: how many files decode at once (the threads').
        request_pixels: the budget of each request.
    """

    def __init__(self, threads: Executor, *, workers: int, request_pixels: int):
        self.threads = threads
        self.free = workers
        self.request_pixels = request_pixels
        self.waiting: dict[_Budget, deque[asyncio.Future[None]]] = {}  # the next request in turn first

    async def decode(self, decode: Callable[[bytes], T], data: bytes, *, draft_size: int) -> T:
        """`decode(data)` on a decoding thread, in its request's turn, once `data`'s pixels fit the budget.

        Args:
            decode: the decoding function; raises `BadImage`.
            data: an image file's bytes.
            draft_size: the size a JPEG may decode at (`load_rgb`'s), for the pixels charged.

        Returns:
            What `decode` returns.

        Raises:
            BadImage: past the request's budget, or whatever `decode` raises.
        """
        request = _REQUEST.get() or _Budget(self.request_pixels)
        await self._turn(request)
        loop = asyncio.get_running_loop()
        job = self.threads.submit(_charged, request, decode, data, draft_size)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._pass))  # once the thread is free
        return await asyncio.wrap_future(job)

    async def _turn(self, request: _Budget) -> None:
        if self.free:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(request, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given a thread as its client left: the next one takes it
                self._pass()
            raise

    def _pass(self) -> None:
        """A thread is free: to the oldest file of the next request in turn, which then goes last."""
        while self.waiting:
            request = next(iter(self.waiting))
            files = self.waiting.pop(request)
            turn = files.popleft()
            if files:
                self.waiting[request] = files
            if not turn.done():  # not one whose client left
                turn.set_result(None)
                return
        self.free += 1


def _charged(request: _Budget, decode: Callable[[bytes], T], data: bytes, draft_size: int) -> T:
    request.charge(pixels_held(data, draft_size=draft_size))
    return decode(data)


class PerRequest:
    """ASGI middleware: a budget of decoded pixels for each HTTP request, which its decodes share.

    Args:
        app: the app.
        pixels: each request's budget.
    """

    def __init__(self, app: ASGIApp, pixels: int):
        self.app = app
        self.pixels = pixels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _REQUEST.set(_Budget(self.pixels) if scope["type"] == "http" else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST.reset(token)


class ReadRefusedBody:
    """ASGI middleware: an answer sent before its request's body was read waits for the body, up to a bound.

    A client that sends its whole body before it reads the answer (Python's urllib, requests) would
    otherwise get a connection reset instead of, say, the 413 of a body over --max-bytes: closing a
    socket with unread data resets it. The answer is sent at once, but not ended until the rest of
    the body is read and dropped, up to `limit` bytes or `seconds`, whichever comes first.

    Args:
        app: the app.
        limit: the most bytes read and dropped.
        seconds: the longest wait for them.
    """

    def __init__(self, app: ASGIApp, *, limit: int, seconds: float):
        self.app = app
        self.limit = limit
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = False

        async def watched() -> Message:
            nonlocal body_read
            message = await receive()
            body_read = body_read or message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def answer(message: Message) -> None:
            if message["type"] != "http.response.body" or message.get("more_body", False) or body_read:
                return await send(message)
            await send({**message, "more_body": True})
            await self._drop_body(receive)
            await send({"type": "http.response.body", "body": b""})

        await self.app(scope, watched, answer)

    async def _drop_body(self, receive: Receive) -> None:
        read = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.seconds):
                while read <= self.limit:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    read += len(message.get("body", b""))


def limit_bodies(app: FastAPI, max_bytes: int) -> None:
    """Refuse request bodies over `max_bytes` with 413 before reading them, saying the limit and what to do.

    Starlette's middleware counts a body as it comes; a declared length over the limit is
    answered at once, here, since Starlette would answer it with a bare "Content Too Large".
    The reason comes in the route's own error format: `{"error"}` on the Open Inference
    Protocol's routes, `{"detail"}` elsewhere.

    Args:
        app: the server.
        max_bytes: the largest body (`--max-bytes`).
    """
    reason = f"the request body is over --max-bytes ({max_bytes:,} bytes): send fewer or smaller images per request"

    def answer(path: str) -> Response:
        return JSONResponse({"error" if path.startswith("/v2") else "detail": reason}, status_code=413)

    async def counted_too_large(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return answer(request.url.path) if exc.status_code == 413 else await http_exception_handler(request, exc)

    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_bytes)
    app.add_middleware(RefuseDeclaredTooLarge, max_bytes=max_bytes, answer=answer)
    app.add_exception_handler(HTTPException, counted_too_large)


class RefuseDeclaredTooLarge:
    """Answer a request whose declared Content-Length is over the limit at once, with `answer(path)`.

    Args:
        app: the application inside.
        max_bytes: the largest body.
        answer: the response for a path.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, answer: Callable[[str], Response]):
        self.app, self.max_bytes, self.answer = app, max_bytes, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                await self.answer(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
