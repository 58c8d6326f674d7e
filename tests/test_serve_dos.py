"""`cnncodes serve` against requests that would take the server: memory-hungry files, requests holding the decoding
threads, bodies refused before they are read. A real server, spoken to over HTTP."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image, PngImagePlugin

from cnncodes.data.decode import BadImage, load_rgb, pixels_held

from .helpers import metric, running_server

MAX_BYTES = 2_000_000
MAX_PIXELS = 5_000_000
REQUEST_PIXELS = 400_000_000
SIDE = 2_000  # the big PNGs: 4 million pixels each, 100 of them fill a request's budget


@pytest.fixture(scope="module")
def guarded(served) -> Iterator[str]:
    """A server with limits the tests reach with small files, and two decoding threads."""
    options = ("--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS), "--threads", "2")
    with running_server(served, *options, "--max-request-pixels", str(REQUEST_PIXELS), log="dos.log") as (url, _):
        yield url


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, image_format, **options)
    return out.getvalue()


def jpeg(side: int, *, progressive: bool) -> bytes:
    return encoded(Image.new("RGB", (side, side), (200, 40, 40)), "JPEG", progressive=progressive)


def predict(url: str, files: list[tuple[str, bytes]], **options) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=[("files", file) for file in files], timeout=120, **options)


def test_a_progressive_jpeg_is_judged_by_its_full_size(guarded):
    baseline, progressive = jpeg(3_000, progressive=False), jpeg(3_000, progressive=True)
    assert Image.open(io.BytesIO(progressive)).info.get("progressive")
    # Both decode at an eighth of their side; the progressive one holds all 9 million pixels meanwhile.
    assert pixels_held(baseline, draft_size=128) == 375 * 375
    assert pixels_held(progressive, draft_size=128) == 3_000 * 3_000
    assert pixels_held(b"no image", draft_size=128) == 0
    answer = predict(guarded, [("baseline.jpg", baseline), ("progressive.jpg", progressive)]).json()
    ok, refused = answer["predictions"]
    assert ok.get("error") is None and ok["label"]
    assert refused["error"] == (
        "too large: a progressive JPEG decodes at full size in memory: 3000x3000 pixels, over the limit of 5,000,000"
    )
    # `predict` and the other commands keep Pillow's bomb limit, far above it.
    assert load_rgb(progressive, draft_size=128).size == (375, 375)


def test_pillow_internals_stay_out_of_the_reasons(guarded):
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * 3_000_000, zip=True)  # 3 kB compressed, over Pillow's 1 MB for one chunk
    data = encoded(Image.new("RGB", (40, 40)), "PNG", pnginfo=text)
    with pytest.raises(BadImage) as bad:
        load_rgb(data)
    assert bad.value.category == "corrupt"
    assert str(bad.value) == "corrupt or unreadable image (a text chunk too large to read)"
    before = metric(guarded, "cnncodes_images_rejected_total", category="corrupt")
    response = predict(guarded, [("text.png", data)])
    assert response.status_code == 400
    assert response.json()["predictions"][0]["error"] == str(bad.value)
    assert "Plugin" not in response.text and "MAX_" not in response.text
    assert metric(guarded, "cnncodes_images_rejected_total", category="corrupt") == before + 1


def test_a_big_request_neither_holds_the_decoders_nor_decodes_past_its_budget(guarded):
    big = encoded(Image.new("RGB", (SIDE, SIDE)), "PNG")  # 12 kB, 0.08 s to decode
    small = encoded(Image.new("RGB", (40, 40), (0, 120, 255)), "PNG")
    files = [(f"big{i}.png", big) for i in range(110)]
    took: dict[str, float] = {}
    answers: dict[str, httpx.Response] = {}

    def send(name: str, request: list[tuple[str, bytes]]) -> None:
        start = time.monotonic()
        answers[name] = predict(guarded, request)
        took[name] = time.monotonic() - start

    sending = threading.Thread(target=send, args=("big", files))
    sending.start()
    time.sleep(0.3)
    send("small", [("small.png", small)])
    sending.join()
    assert answers["small"].status_code == 200 and answers["big"].status_code == 200
    assert took["small"] < took["big"] / 3, took
    # 100 files of 4 million pixels fill the budget; the 10 after them are refused, not decoded.
    errors = [p.get("error") for p in answers["big"].json()["predictions"]]
    budget = REQUEST_PIXELS // (SIDE * SIDE)
    assert errors[:budget] == [None] * budget
    assert set(errors[budget:]) == {
        f"not decoded: this request's images decode to over {REQUEST_PIXELS:,} pixels, the server's "
        "--max-request-pixels: send fewer or smaller images per request"
    }
    assert httpx.get(f"{guarded}/metadata").json()["limits"]["max_request_pixels"] == REQUEST_PIXELS


def test_a_client_sending_a_whole_body_over_max_bytes_sees_the_413(guarded):
    # urllib sends the whole body before reading the answer; closing on unread bytes would reset the connection.
    request = urllib.request.Request(
        f"{guarded}/predict", data=bytes(3 * MAX_BYTES), headers={"Content-Type": "image/png"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert "--max-bytes" in json.loads(refused.value.read())["detail"]
    assert predict(guarded, [("a.png", encoded(Image.new("RGB", (40, 40)), "PNG"))]).status_code == 200
