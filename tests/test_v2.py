"""`cnncodes serve` speaking the Open Inference Protocol (KServe V2): through tritonclient and as raw requests."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from cnncodes.cli.main import app

from .helpers import MAX_BYTES, V2_MODEL, fake_app, in_process, png_of, runner

MODEL = V2_MODEL  # the shared `server` names its model so
CLASSES = ["circles", "squares", "stripes"]


@pytest.fixture(scope="module")
def expected(served) -> list[dict]:
    """What `cnncodes predict` says of the served images, top 2."""
    result = runner.invoke(
        app, ["predict", str(served["model"]), *map(str, served["images"]), "--format", "json", "--top-k", "2"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def binary_body(*elements: bytes) -> tuple[bytes, dict[str, str]]:
    """A request with the binary tensor data extension: its JSON header, then the length-prefixed elements."""
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    text = json.dumps(image_input(len(elements), parameters={"binary_data_size": len(data)})).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text))}


def image_input(count: int, **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count], **extra}]}


def test_tritonclient_answers_equal_predicts(server, served, expected):
    images = served["images"]
    with triton.InferenceServerClient(server.removeprefix("http://")) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_model_metadata(MODEL) == {
            "name": MODEL,
            "versions": ["1"],
            "platform": "cnncodes",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
        }
        tensor = triton.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_), binary_data=True)
        top = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
        whole = client.infer(MODEL, [tensor])  # every output, in binary
        as_json = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("probabilities", False)])
    classified = [[item.decode().split(":") for item in row] for row in top.as_numpy("probabilities")]
    assert top.as_numpy("probabilities").shape == (len(images), 2)
    assert [[label for _, _, label in row] for row in classified] == [
        [t["label"] for t in e["top_k"]] for e in expected
    ]
    np.testing.assert_allclose(
        [[float(p) for p, _, _ in row] for row in classified],
        [[t["probability"] for t in e["top_k"]] for e in expected],
        atol=1e-5,
    )
    probabilities = whole.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(images), 3)
    assert [CLASSES[i] for i in probabilities.argmax(axis=1)] == [e["label"] for e in expected]
    assert [[CLASSES[int(i)] for _, i, _ in row] for row in classified] == [
        [label for _, _, label in row] for row in classified
    ]
    np.testing.assert_allclose(probabilities.max(axis=1), [e["probability"] for e in expected], atol=1e-5)
    np.testing.assert_array_equal(as_json.as_numpy("probabilities"), probabilities)


def test_raw_requests_as_curl_sends_them(server, served, expected):
    photo = served["images"][0].read_bytes()
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server}/v2").json()["extensions"] == ["binary_tensor_data", "classification"]
    assert httpx.get(f"{server}/v2/models/{MODEL}/versions/1/ready").json() == {"name": MODEL, "ready": True}

    whole = httpx.post(
        f"{server}/v2/models/{MODEL}/infer", content=photo, headers={"Inference-Header-Content-Length": "0"}
    )
    assert whole.status_code == 200
    [output] = whole.json()["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [1, 3]
    assert CLASSES[int(np.argmax(output["data"]))] == expected[0]["label"]

    request = image_input(2, data=[base64.b64encode(photo).decode()] * 2)
    request["outputs"] = [{"name": "probabilities", "parameters": {"classification": 9}}]  # more than 3 classes
    classified = httpx.post(f"{server}/v2/models/{MODEL}/versions/1/infer", json={**request, "id": "r1"}).json()
    assert classified["id"] == "r1" and classified["model_name"] == MODEL and classified["model_version"] == "1"
    [output] = classified["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    assert output["data"][0].endswith(f":{expected[0]['label']}") and output["data"][:3] == output["data"][3:]

    octet = httpx.post(f"{server}/predict", content=photo, headers={"content-type": "application/octet-stream"})
    assert octet.status_code == 200 and octet.json()["predictions"][0]["label"] == expected[0]["label"]
    for path, status in (("/v2/models/other/ready", 404), (f"/v2/models/{MODEL}/versions/2", 404)):
        answer = httpx.get(f"{server}{path}")
        assert answer.status_code == status and "error" in answer.json()


def test_hostile_bodies_get_400_with_an_error_and_the_server_goes_on(server, served):
    photo = served["images"][0].read_bytes()
    good, good_headers = binary_body(photo)
    header_only = json.dumps(image_input(1, parameters={"binary_data_size": 8})).encode()
    past_end = header_only + struct.pack("<I", 1_000_000) + b"abcd"
    hostile = [
        (good, {"Inference-Header-Content-Length": str(len(good) + 1)}, "the body has"),
        (good, {"Inference-Header-Content-Length": "-5"}, "the body has"),
        (good, {"Inference-Header-Content-Length": "twelve"}, "whole number"),
        (past_end, {"Inference-Header-Content-Length": str(len(header_only))}, "runs past the end"),
        (b"{not json", {}, "not JSON"),
        (b"[1, 2]", {}, "JSON object"),
        (json.dumps(image_input(-1, data=[])).encode(), {}, "shape [N]"),
        (json.dumps(image_input(10**12, data=[])).encode(), {}, "shape [N]"),
        (json.dumps(image_input(1, data=["a"], datatype="FP32")).encode(), {}, "must be BYTES"),
        (json.dumps({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1]}]}).encode(), {}, "unknown input"),
        (json.dumps({**image_input(1, data=["aGk="]), "outputs": [{"name": "logits"}]}).encode(), {}, "unknown output"),
        (json.dumps(image_input(1, data=["%%%"])).encode(), {}, "not base64"),
        (json.dumps(image_input(1, parameters=[1])).encode(), {}, "must be an object"),
        (good, {}, "not JSON"),  # binary data without its header's length
        (good + b"xx", good_headers, "binary_data_size"),
    ]
    for body, headers, words in hostile:
        answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert answer.status_code == 400 and words in answer.json()["error"], (words, answer.text)
    mixed, mixed_headers = binary_body(photo, b"garbage")
    unreadable = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=mixed, headers=mixed_headers)
    assert unreadable.status_code == 400 and unreadable.json()["error"].startswith("image[1] cannot be read")
    too_big = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"x" * (MAX_BYTES + 1))
    assert too_big.status_code == 413 and "--max-bytes" in too_big.json()["error"]
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=good, headers=good_headers, timeout=30)
    assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 3]


def test_the_model_is_named_after_its_run_and_is_not_ready_before_its_warm_up():
    asgi = httpx.ASGITransport(app=fake_app(lambda pixels: np.tile([0.25, 0.75], (len(pixels), 1))))

    async def probe() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=asgi, base_url="http://test") as client:
            return [await client.get(path) for path in ("/v2/health/ready", "/v2/models/fake/ready", "/v2/models/fake")]

    ready, model_ready, metadata = asyncio.run(probe())
    assert ready.status_code == model_ready.status_code == 503 and ready.json() == {"ready": False}
    assert metadata.json()["name"] == "fake" and metadata.json()["outputs"][0]["shape"] == [-1, 2]


def test_a_failed_forward_pass_is_a_v2_error():
    def fails(pixels):
        if pixels.max() == 255:
            raise RuntimeError("a kernel failed")
        return np.tile([0.25, 0.75], (len(pixels), 1))

    async def calls(client):
        while (await client.get("/v2/health/ready")).status_code != 200:
            await asyncio.sleep(0.05)
        headers = {"Inference-Header-Content-Length": "0"}
        return (
            await client.post("/v2/models/fake/infer", content=png_of(255), headers=headers),
            await client.post("/v2/models/fake/infer", content=png_of(9), headers=headers),
        )

    failed, answered = in_process(fake_app(fails), calls)
    assert failed.status_code == 500 and failed.json() == {"error": "the forward pass failed: a kernel failed"}
    assert answered.json()["outputs"][0]["data"] == [0.25, 0.75]


def test_a_failed_warm_up_makes_the_server_not_live_and_infer_503():
    def broken(pixels):
        raise MemoryError("onnxruntime could not allocate 2 GB")

    async def calls(client):
        while (live := await client.get("/v2/health/live")).status_code == 200:
            await asyncio.sleep(0.05)
        headers = {"Inference-Header-Content-Length": "0"}
        return live, await client.post("/v2/models/fake/infer", content=png_of(9), headers=headers)

    live, infer = in_process(fake_app(broken), calls)
    assert live.status_code == infer.status_code == 503 and live.json() == {"live": False}
    assert "failed its warm-up" in infer.json()["error"]
