"""POST /explain: one uploaded image's prediction and the heat map of why, drawn on the image.

The map is `cnncodes explain`'s: a bundle's classifier read back onto its network's unpooled
maps (CAM or occlusion), a fine-tuned `.keras` model's Grad-CAM. The explainer loads on the
first request, not at start: a bundle's map network is a second copy of the backbone in
memory, and Grad-CAM needs TensorFlow, which a serving image may not have. A model that
cannot be explained answers 501 with the reason, every time, without trying again.
One explanation runs at a time, on the decoding threads; a few more may wait, then 503.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.data.decode import BadImage, load_rgb, to_square
from cnncodes.explain.explainers import UNITS, Explainer, load_explainer
from cnncodes.explain.render import drawn, png_bytes, positive_top
from cnncodes.serving.batcher import MicroBatcher
from cnncodes.serving.predict import Predictor
from cnncodes.serving.settings import ServeSettings

# Explanations waiting for the running one; one more is a 503 with Retry-After.
EXPLAIN_WAITING = 4
# The status a request whose client left before it was answered is counted under (nginx's).
CLIENT_GONE = 499


class LazyExplainer:
    """The served model's explainer, loaded once, on the first request that needs it.

    Args:
        predictor: the served model, which the explainer must be the same file as.
        settings: where the model is, and whether heat maps are on (`explain`).
        threads: where loading runs, off the event loop.
    """

    def __init__(self, predictor: Predictor, settings: ServeSettings, threads: Executor):
        self.predictor, self.settings, self.threads = predictor, settings, threads
        self.explainer: Explainer | None = None
        self.failure = None if settings.explain else "this server was started with --no-explain"
        self.lock = asyncio.Lock()

    async def get(self) -> Explainer:
        """The explainer, loaded now if it is not yet.

        Raises:
            HTTPException: 501 with the reason this model has no heat maps here.
        """
        async with self.lock:
            if self.explainer is None and self.failure is None:
                try:
                    self.explainer = await asyncio.get_running_loop().run_in_executor(self.threads, self._load)
                except CnnCodesError as e:
                    self.failure = str(e)
                except ImportError as e:  # Grad-CAM in an image without TensorFlow
                    self.failure = f"its explainer needs {e.name or first_line(e)}, which is not installed here"
        if self.explainer is None:
            raise HTTPException(501, f"no heat maps for this model: {self.failure}")
        return self.explainer

    def _load(self) -> Explainer:
        settings = self.settings
        explainer = load_explainer(settings.model, settings.weights, settings.runtime, settings.threads)
        if explainer.record.get("model_sha256") != self.predictor.record.get("model_sha256"):
            raise CnnCodesError(f"{settings.model} changed since the server started: restart the server")
        return explainer


def add_explain_route(
    app: FastAPI,
    *,
    predictor: Predictor,
    settings: ServeSettings,
    batcher: MicroBatcher,
    threads: Executor,
    read_uploads: Callable[[Request], Awaitable[list[tuple[str, bytes]]]],
    on_rejected: Callable[[BadImage], None],
    upload_schema: dict[str, Any],
) -> None:
    """POST /explain: the body forms of /predict, one image; JSON with its top-k, the map and the overlay.

    Args:
        app: the service.
        predictor: the served model (its classes and the way it lists the top-k).
        settings: the model's file, `max_pixels` and whether heat maps are on.
        batcher: refuses the request at once while the queue is full or the model failed.
        threads: the decoding threads, where loading, decoding, the maps and the drawing run.
        read_uploads: /predict's reader of a request's (filename, bytes) images.
        on_rejected: counts an upload that is not a readable image.
        upload_schema: /predict's OpenAPI description of its body and answers, which /explain shares.
    """
    explainers = LazyExplainer(predictor, settings, threads)
    running = asyncio.Semaphore(1)
    inside = 0

    unavailable = {"501": {"description": "This model has no heat maps here (the reason)"}}
    schema = {**upload_schema, "responses": {**upload_schema["responses"], **unavailable}}

    @app.post("/explain", openapi_extra=schema)
    async def explain(
        request: Request,
        top_k: int = Query(3, ge=1, description="Classes listed."),
        label: str | None = Query(None, description="Explain this class instead of the most probable one."),
    ):
        nonlocal inside
        batcher.admit()
        if inside > EXPLAIN_WAITING:
            raise HTTPException(503, "too many heat maps waiting: send the request again later", {"Retry-After": "1"})
        inside += 1
        try:
            wanted = _class_index(predictor.classes, label)
            uploads = await read_uploads(request)
            if len(uploads) != 1:
                raise HTTPException(400, f"/explain takes one image per request (got {len(uploads)})")
            explainer = await explainers.get()
            async with running:
                return await asyncio.get_running_loop().run_in_executor(
                    threads, _explained, explainer, predictor, uploads[0], wanted, top_k, settings.max_pixels
                )
        except ClientDisconnect:
            return Response(status_code=CLIENT_GONE)
        except BadImage as bad:
            on_rejected(bad)
            raise HTTPException(400, f"{uploads[0][0]} cannot be read: {bad}") from None
        finally:
            inside -= 1


def _class_index(classes: list[str], label: str | None) -> int | None:
    if label is None:
        return None
    if label not in classes:
        known = ", ".join(map(repr, classes[:20])) + (", …" if len(classes) > 20 else "")
        raise HTTPException(400, f"unknown class {label[:80]!r}: this model knows {known}")
    return classes.index(label)


def _explained(
    explainer: Explainer,
    predictor: Predictor,
    upload: tuple[str, bytes],
    wanted: int | None,
    top_k: int,
    max_pixels: int,
) -> dict[str, Any]:
    """One image's answer: its prediction, the explained class, the raw map and the map drawn on the image."""
    filename, data = upload
    size, resize = explainer.image_size, explainer.resize
    image = load_rgb(data, draft_size=size, max_pixels=max_pixels)  # as `Predictor.pixels` decodes
    found = explainer.explain(
        to_square(image, size, resize)[None],
        lambda proba: np.argsort(-proba, axis=1, kind="stable")[:, :1] if wanted is None else np.array([[wanted]]),
    )
    proba, index, grid = found.probabilities[0], int(found.explained[0, 0]), found.maps[0, :, :, 0]
    label, probability = predictor.classes[index], float(proba[index])
    picture = drawn(
        image,
        grid,
        size=size,
        resize=resize,
        top=positive_top(grid),
        caption=f"{label}  {probability:.1%}  ({found.method})",
    )
    return {
        **predictor.answer(filename, proba, top_k).to_dict(),
        "explained": {"label": label, "probability": round(probability, 6)},
        "method": found.method,
        "units": UNITS[found.method],
        "map": [[round(v, 6) if math.isfinite(v) else None for v in row] for row in grid.tolist()],
        "overlay": "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii"),
    }
