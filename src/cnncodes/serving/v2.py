"""The Open Inference Protocol (KServe V2 REST) on `cnncodes serve`, so Triton and KServe clients can call it.

One model, one version ("1"), one input and one output: a BYTES tensor `image` of shape [N] holding
encoded images (each a file's bytes), and `probabilities`, FP32 [N, classes]. Images come as JSON
(base64 strings in `data`) or with the binary tensor data extension: a JSON header of
`Inference-Header-Content-Length` bytes, then each binary tensor, its elements each a 4-byte
little-endian length and that many bytes. `Inference-Header-Content-Length: 0` makes the whole body
one image, so `curl --data-binary @photo.jpg` works. The classification extension
(`parameters.classification: k` on the output) answers "probability:index:label" BYTES [N, k].
Errors are `{"error": "..."}`; an unreadable image fails its whole request with a 400 naming it,
since V2 has no error per element.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

import cnncodes
from cnncodes.data.decode import BadImage
from cnncodes.serving.batcher import MicroBatcher

VERSION = "1"
INPUT = "image"
OUTPUT = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
# What a client may send and ask, answered in GET /v2.
EXTENSIONS = ["binary_tensor_data", "classification"]
# The status a request whose client left before it was answered is counted under (nginx's).
CLIENT_GONE = 499


class V2Error(Exception):
    """A request this protocol refuses: answered as `{"error": message}` with `status` (and `headers`)."""

    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass(frozen=True)
class Requested:
    """One output a request asks for: `classification` > 0 asks its top classes; `binary` asks raw bytes."""

    classification: int
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: the encoded images, in order, and the outputs asked for."""

    images: list[bytes]
    outputs: list[Requested]
    id: str | None = None


def parse_infer(body: bytes, header_length: str | None, *, max_images: int) -> InferRequest:
    """An infer request's images and wanted outputs, checked before any image is decoded.

    Args:
        body: the request body.
        header_length: its `Inference-Header-Content-Length` header, if any.
        max_images: the most images one request may carry.

    Returns:
        The request.

    Raises:
        V2Error: the body does not follow the protocol, or names a tensor, datatype or shape this model has not.
    """
    if header_length is None:
        header, binary = _json_object(body), b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise V2Error(f"{HEADER_LENGTH} must be a whole number of bytes (got {header_length[:40]!r})") from None
        if length == 0:  # the whole body is one image
            return InferRequest([body], [Requested(0, False)])
        if not 0 < length <= len(body):
            raise V2Error(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
        header, binary = _json_object(body[:length]), body[length:]
    images = _images(header.get("inputs"), binary, max_images)
    request_id = header.get("id")
    return InferRequest(images, _outputs(header), request_id if isinstance(request_id, str) else None)


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise V2Error("the inference header is not JSON") from None
    if not isinstance(header, dict):
        raise V2Error("the inference header must be a JSON object")
    return header


def _images(inputs: Any, binary: bytes, max_images: int) -> list[bytes]:
    """The encoded images of the one input tensor, `image`, from its JSON data or from the binary section."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error(f"give exactly one input, the BYTES tensor {INPUT!r} of shape [N]")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise V2Error(f"unknown input tensor {str(tensor.get('name'))[:80]!r}: this model takes {INPUT!r}")
    if tensor.get("datatype") != "BYTES":
        raise V2Error(f"input {INPUT!r} must be BYTES (encoded images), not {str(tensor.get('datatype'))[:20]}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and 1 <= shape[0] <= max_images):
        raise V2Error(f"input {INPUT!r} must have shape [N], 1 <= N <= {max_images} (got {str(shape)[:80]})")
    options = tensor.get("parameters") or {}
    if not isinstance(options, dict):
        raise V2Error(f"the parameters of input {INPUT!r} must be an object")
    size = options.get("binary_data_size")
    if size is None:
        if binary:
            raise V2Error(f"the body has {len(binary)} bytes after the header that no tensor claims")
        return _from_json(tensor.get("data"), shape[0])
    if type(size) is not int or size != len(binary):
        raise V2Error(f"binary_data_size of {INPUT!r} must be the {len(binary)} bytes after the header")
    return _from_binary(binary, shape[0])


def _from_json(data: Any, count: int) -> list[bytes]:
    if not isinstance(data, list) or len(data) != count or not all(isinstance(item, str) for item in data):
        raise V2Error(f"input {INPUT!r} needs 'data': {count} base64 strings (or binary data)")
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except binascii.Error:
        raise V2Error(f"input {INPUT!r} holds an element that is not base64") from None


def _from_binary(binary: bytes, count: int) -> list[bytes]:
    """The `count` elements of a binary BYTES tensor, each a 4-byte little-endian length and its bytes."""
    images, position = [], 0
    for index in range(count):
        if position + 4 > len(binary):
            raise V2Error(f"{INPUT}[{index}]: the binary data ends before its 4-byte length")
        (length,) = struct.unpack_from("<I", binary, position)
        position += 4
        if position + length > len(binary):
            raise V2Error(f"{INPUT}[{index}]: its length, {length} bytes, runs past the end of the binary data")
        images.append(binary[position : position + length])
        position += length
    if position != len(binary):
        raise V2Error(f"the binary data has {len(binary) - position} bytes after its {count} elements")
    return images


def _outputs(header: dict[str, Any]) -> list[Requested]:
    """The outputs asked for: each is `probabilities`, whole or as its top classes; none asks it whole."""
    parameters = header.get("parameters") or {}
    binary = parameters.get("binary_data_output", False) is True if isinstance(parameters, dict) else False
    asked = header.get("outputs")
    if asked is None:
        return [Requested(0, binary)]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise V2Error("'outputs' must be a list of objects")
    wanted = []
    for output in asked:
        if output.get("name") != OUTPUT:
            raise V2Error(f"unknown output tensor {str(output.get('name'))[:80]!r}: this model gives {OUTPUT!r}")
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise V2Error(f"the parameters of output {OUTPUT!r} must be an object")
        k = options.get("classification", 0)
        if type(k) is not int or k < 0:
            raise V2Error(f"classification must be a whole number of classes (got {str(k)[:20]})")
        wanted.append(Requested(k, options.get("binary_data", binary) is True))
    return wanted


def infer_response(
    rows: np.ndarray, request: InferRequest, *, model: str, classes: list[str]
) -> tuple[dict[str, Any], bytes]:
    """The response header and binary section for `rows`, the class probabilities of the request's images.

    Args:
        rows: (N, classes) probabilities.
        request: the request, for its outputs and id.
        model: the model's name.
        classes: the class labels, by index.

    Returns:
        The JSON header, and the bytes of the outputs asked in binary (empty if none).
    """
    outputs, binary = [], []
    for wanted in request.outputs:
        if wanted.classification:
            k = min(wanted.classification, len(classes))
            order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
            labels = [[f"{row[i]:.6f}:{i}:{classes[i]}" for i in top] for row, top in zip(rows, order)]
            tensor: dict[str, Any] = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(rows), k]}
            data: bytes = b"".join(_length_prefixed(label.encode()) for row in labels for label in row)
            values: list[Any] = [label for row in labels for label in row]
        else:
            tensor = {"name": OUTPUT, "datatype": "FP32", "shape": list(rows.shape)}
            data = rows.astype("<f4").tobytes()
            values = rows.astype(np.float32).ravel().tolist()
        if wanted.binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            tensor["data"] = values
        outputs.append(tensor)
    header = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    return header, b"".join(binary)


def _length_prefixed(element: bytes) -> bytes:
    return struct.pack("<I", len(element)) + element


def add_v2_routes(
    app: FastAPI,
    *,
    name: str,
    classes: list[str],
    batcher: MicroBatcher,
    pixels_of: Callable[[bytes], Awaitable[np.ndarray]],
    on_images: Callable[[int], None],
    max_images: int,
) -> None:
    """The protocol's routes: server health and metadata, model metadata and readiness, and infer.

    Args:
        app: the service to add them to.
        name: the model's name in the protocol's paths.
        classes: the class labels, by index.
        batcher: the micro-batcher the forward passes go through (its `ready` and `failure` are the health).
        pixels_of: decodes one image's bytes on a thread; raises `BadImage`.
        on_images: called with the number of images each answered request predicted.
        max_images: the most images one request may carry.
    """
    metadata = {
        "name": name,
        "versions": [VERSION],
        "platform": "cnncodes",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]}],
    }

    def known(model: str, version: str | None) -> None:
        if model != name:
            raise V2Error(f"unknown model {model[:80]!r}: this server serves {name!r}", 404)
        if version not in (None, VERSION):
            raise V2Error(f"model {name!r} has no version {version[:20]!r}: its one version is {VERSION!r}", 404)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "cnncodes", "version": cnncodes.__version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live():
        return JSONResponse({"live": not batcher.failure}, status_code=503 if batcher.failure else 200)

    @app.get("/v2/health/ready")
    async def ready():
        up = batcher.ready and not batcher.failure
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    async def model_metadata(model: str, version: str | None = None):
        known(model, version)
        return metadata

    async def model_ready(model: str, version: str | None = None):
        known(model, version)
        up = batcher.ready and not batcher.failure
        return JSONResponse({"name": name, "ready": up}, status_code=200 if up else 503)

    async def infer(request: Request, model: str, version: str | None = None):
        known(model, version)
        try:  # before reading and decoding a body no forward pass would take
            batcher.admit()
        except HTTPException as refused:
            raise V2Error(str(refused.detail), refused.status_code, refused.headers) from None
        try:
            body = await request.body()
        except ClientDisconnect:  # nobody to answer: counted, not logged as a server error
            return Response(status_code=CLIENT_GONE)
        parsed = parse_infer(body, request.headers.get(HEADER_LENGTH), max_images=max_images)
        rows = await _forward(parsed.images, pixels_of, batcher)
        on_images(len(rows))
        header, binary = infer_response(rows, parsed, model=name, classes=classes)
        if not binary:
            return JSONResponse(header)
        text = json.dumps(header).encode()
        return Response(text + binary, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))})

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.add_api_route(prefix, model_metadata, methods=["GET"])
        app.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"])
        app.add_api_route(f"{prefix}/infer", infer, methods=["POST"])
    app.add_exception_handler(V2Error, _v2_error)


async def _forward(
    images: list[bytes], pixels_of: Callable[[bytes], Awaitable[np.ndarray]], batcher: MicroBatcher
) -> np.ndarray:
    """The probabilities of every image, or a V2Error naming the first that cannot be read or predicted."""
    decoded, outcomes = [], await asyncio.gather(*map(pixels_of, images), return_exceptions=True)
    for index, pixels in enumerate(outcomes):
        if isinstance(pixels, BadImage):
            raise V2Error(f"{INPUT}[{index}] cannot be read: {pixels}")
        if isinstance(pixels, BaseException):
            raise pixels
        decoded.append(pixels)
    try:
        return np.stack(await asyncio.gather(*map(batcher.submit, decoded)))
    except HTTPException as failed:
        raise V2Error(str(failed.detail), failed.status_code, failed.headers) from None


async def _v2_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, V2Error)
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)
