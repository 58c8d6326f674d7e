"""Images of concurrent requests gathered into one forward pass, so a busy server runs at `predict`'s batched rate."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import HTTPException

from cnncodes.core.errors import first_line
from cnncodes.serving.metrics import Metrics
from cnncodes.serving.settings import ServeSettings

# uvicorn's own logger: the messages land in the log uvicorn configures, beside its own.
log = logging.getLogger("uvicorn.error")


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

    Backpressure: beyond `max_queue` waiting images a request gets a 503 with Retry-After at
    once, and an image without its answer after `timeout` seconds a 504 (its place in the
    queue is given up, so a slow pass does not pile up work nobody waits for). `drain` makes
    `ready` false for good, for the readiness probes of a server that is stopping.

    Args:
        probabilities: the model's forward pass, pixels (N, size, size, 3) to class probabilities (N, classes).
        settings: its max_batch, batch_wait_ms, max_queue and timeout.
        metrics: where batch sizes, forward-pass times and the queue's length are reported.
    """

    def __init__(self, probabilities: Callable[[np.ndarray], np.ndarray], *, settings: ServeSettings, metrics: Metrics):
        self.probabilities = probabilities
        self.max_batch = settings.max_batch
        self.wait = settings.batch_wait_ms / 1000
        self.max_queue = settings.max_queue or 4 * settings.max_batch
        self.timeout = settings.timeout
        self.metrics = metrics
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        metrics.queued.set_function(lambda: len(self.pending))
        self.arrived = asyncio.Event()
        self.forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnncodes-forward")
        self.task: asyncio.Task | None = None
        self.ready = False
        self.draining = False
        self.failure: str | None = None

    def start(self, image_size: int) -> None:
        """Start the warm-up, then the batching loop, on the running event loop.

        Args:
            image_size: the model's input size, for the warm-up passes.
        """
        self.task = asyncio.create_task(self._run(image_size))
        self.task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """End the loop and wait for a forward pass under way."""
        if self.task:
            self.task.cancel()
        self.forward.shutdown(wait=True)

    def drain(self) -> None:
        """Say not ready from now on (the server is stopping); images already queued are still answered."""
        self.draining = True
        self.ready = False

    def admit(self) -> None:
        """Refuse a request no forward pass would take, before its body is read and decoded.

        Raises:
            HTTPException: 503 once the batcher has failed for good, or (with Retry-After) while the queue is full.
        """
        if self.failure:
            raise HTTPException(503, self.failure)
        if len(self.pending) >= self.max_queue:
            raise HTTPException(
                503,
                f"{len(self.pending)} images are waiting, the server's --max-queue: send the request again later",
                headers={"Retry-After": "1"},
            )

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """The class probabilities of one image's pixels, computed in some batch.

        Args:
            pixels: one image, (size, size, 3) uint8.

        Returns:
            Its row of class probabilities.

        Raises:
            HTTPException: 503 once the batcher has failed for good or while the queue is full, 500 if this
                image's batch failed, 504 if it had no answer within the timeout.
        """
        self.admit()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        late = f"no prediction within the server's --timeout of {self.timeout:g} s: try again later"
        # The deadline fails the future itself: a cancellation of the request (uvicorn's shutdown) stays its own.
        deadline = loop.call_later(self.timeout, _fail, [(pixels, future)], 504, late)
        future.add_done_callback(lambda _: deadline.cancel())
        self.pending.append((pixels, future))
        self.arrived.set()
        return await future

    def _forward(self, images: list[np.ndarray]) -> np.ndarray:
        pixels = np.stack(images)
        sizes = _powers_of_two(len(pixels))
        starts = np.cumsum([0, *sizes[:-1]])
        with self.metrics.forward_seconds.time():
            pieces = [self.probabilities(pixels[start : start + size]) for start, size in zip(starts, sizes)]
        rows = np.concatenate(pieces)
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
        self.ready = not self.draining
        while True:
            if not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
                if len(self.pending) < self.max_batch:
                    await asyncio.sleep(self.wait)
            taken = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            items = [(pixels, future) for pixels, future in taken if not future.done()]  # not those past --timeout
            if not items:
                continue
            try:
                self.metrics.batch_size.observe(len(items))
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
