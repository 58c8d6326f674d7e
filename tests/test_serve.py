"""`cnncodes serve` as a client sees it: a real uvicorn server in a subprocess, spoken to over HTTP with httpx."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import cnncodes
from cnncodes.cli.main import app

from .helpers import (
    MAX_BYTES,
    fake_app,
    in_process,
    io_bytes,
    metric,
    png_of,
    runner,
    running_server,
    upload,
    write_image,
)
from .test_ingest import png_header_only


def test_health_readiness_and_metadata(server, served):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json() == {"status": "ready"}
    meta = httpx.get(f"{server}/metadata").json()
    record = json.loads(served["model"].with_suffix(".json").read_text())
    assert meta["classes"] == record["classes"] == ["circles", "squares", "stripes"] and meta["precision"] == "fp32"
    assert (meta["backbone"], meta["layer"], meta["input_size"], meta["resize"]) == (
        "mobilenetv2",
        "out_relu",
        128,
        "crop",
    )
    assert meta["run"]["run"] == record["run"] and meta["run"]["accuracy"] == record["accuracy"]
    assert meta["run"]["ece"] == record["ece"] and meta["run"]["accuracy_mean"] is None  # one split
    assert meta["limits"]["max_bytes"] == MAX_BYTES and meta["batching"]["max_batch"] == 8


def test_predictions_equal_cnncodes_predict(server, served):
    images = served["images"]
    cli = runner.invoke(
        app, ["predict", str(served["model"]), *map(str, images), "--format", "json", "--top-k", "2", "--quiet"]
    )
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.stdout)
    response = httpx.post(f"{server}/predict", params={"top_k": 2}, files=upload(images))
    assert response.status_code == 200
    got = response.json()["predictions"]
    assert [g["filename"] for g in got] == [p.name for p in images]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [[t["label"] for t in g["top_k"]] for g in got] == [[t["label"] for t in e["top_k"]] for e in expected]
    np.testing.assert_allclose([g["probability"] for g in got], [e["probability"] for e in expected], atol=1e-5)
    assert all(g["error"] is None and len(g["top_k"]) == 2 for g in got)

    raw = httpx.post(f"{server}/predict", content=images[0].read_bytes(), headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200
    [one] = raw.json()["predictions"]
    assert one["label"] == expected[0]["label"] and len(one["top_k"]) == 3  # the default top_k


def test_a_mixed_request_answers_each_image_in_order(server, served):
    good = served["images"][:2]
    truncated = good[0].read_bytes()[:200]
    files = [
        upload(good[:1])[0],
        ("files", ("cut.jpg", truncated)),
        ("files", ("notes.txt", b"plain text")),
        ("files", ("empty.png", b"")),
        upload(good[1:])[0],
    ]
    response = httpx.post(f"{server}/predict", files=files)
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert [a["filename"] for a in answers] == [good[0].name, "cut.jpg", "notes.txt", "empty.png", good[1].name]
    assert answers[0]["label"] and answers[4]["label"] and answers[0]["error"] is None
    assert "truncated" in answers[1]["error"] or "corrupt" in answers[1]["error"]
    assert "not an image" in answers[2]["error"] and answers[3]["error"] == "empty file"
    assert all(a["label"] is None and a["top_k"] == [] for a in answers[1:4])


def test_unreadable_uploads_get_400_with_the_reason(server, served, tmp_path):
    bomb = png_header_only(60_000, 60_000)
    for body, content_type, words in [
        (b"\xff\xd8\xff\xe0 not really", "image/jpeg", "corrupt"),
        (bomb, "image/png", "too large"),
        (b"", "image/png", "empty"),
    ]:
        response = httpx.post(f"{server}/predict", content=body, headers={"content-type": content_type})
        assert response.status_code == 400, words
        assert words in response.json()["predictions"][0]["error"]
    bombs = httpx.post(f"{server}/predict", files=[("files", ("bomb.png", bomb))] * 2)
    assert bombs.status_code == 400 and all("decompression bomb" in p["error"] for p in bombs.json()["predictions"])
    wrong_field = httpx.post(f"{server}/predict", files=[("image", ("a.jpg", served["images"][0].read_bytes()))])
    assert wrong_field.status_code == 400 and "named 'files'" in wrong_field.json()["detail"]


def test_wrong_content_types_get_415(server):
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/json"}, {}):
        response = httpx.post(f"{server}/predict", content=b"{}", headers=headers)
        assert response.status_code == 415
        assert "multipart/form-data" in response.json()["detail"]


def test_bodies_over_max_bytes_get_413_before_they_are_read(server):
    big = np.random.default_rng(0).bytes(MAX_BYTES + 1)
    assert httpx.post(f"{server}/predict", content=big, headers={"content-type": "image/png"}).status_code == 413
    refused = httpx.post(f"{server}/predict", files=[("files", ("big.png", big))])
    assert refused.status_code == 413 and f"--max-bytes ({MAX_BYTES:,} bytes)" in refused.json()["detail"]
    chunks = (big[i : i + 16_384] for i in range(0, len(big), 16_384))  # no Content-Length: counted as it comes
    assert httpx.post(f"{server}/predict", content=chunks, headers={"content-type": "image/png"}).status_code == 413
    # A declared 1 GB body is answered at once, without waiting for a byte of it.
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000000\r\n\r\n"
        )
        assert conn.recv(1024).startswith(b"HTTP/1.1 413")


def test_errors_never_show_a_stack_trace(server):
    responses = [
        httpx.get(f"{server}/nowhere"),
        httpx.get(f"{server}/predict"),
        httpx.get(f"{server}/docs"),
        httpx.post(f"{server}/predict?top_k=0", files=[("files", ("a.png", b"x"))]),
        httpx.post(f"{server}/predict?top_k=many", files=[("files", ("a.png", b"x"))]),
        httpx.post(
            f"{server}/predict",
            content=b"--xx\r\ngarbage",
            headers={"content-type": "multipart/form-data; boundary=xx"},
        ),
    ]
    assert [r.status_code for r in responses] == [404, 405, 404, 422, 422, 400]
    for r in responses:
        assert "Traceback" not in r.text and 'File "' not in r.text and ".py" not in r.text


def test_concurrent_requests_share_forward_passes_and_are_counted(server, served):
    before = {
        name: metric(server, name)
        for name in ("cnncodes_batch_images_count", "cnncodes_batch_images_sum", "cnncodes_images_predicted_total")
    }
    before_415 = metric(server, "cnncodes_requests_total", route="/predict", status="415")
    images = served["images"][:12]

    def one(path: Path) -> int:
        return httpx.post(f"{server}/predict", files=upload([path]), timeout=30).status_code

    before_empty = metric(server, "cnncodes_images_rejected_total", category="empty")
    threads_done: list[int] = []
    threads = [threading.Thread(target=lambda p=p: threads_done.append(one(p))) for p in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    httpx.post(f"{server}/predict", content=b"x", headers={"content-type": "text/plain"})
    httpx.post(f"{server}/predict", files=[("files", ("empty.png", b""))])
    assert threads_done == [200] * len(images)
    batches = metric(server, "cnncodes_batch_images_count") - before["cnncodes_batch_images_count"]
    batched = metric(server, "cnncodes_batch_images_sum") - before["cnncodes_batch_images_sum"]
    predicted = metric(server, "cnncodes_images_predicted_total") - before["cnncodes_images_predicted_total"]
    assert batched == predicted == len(images)
    assert batches < len(images)  # some forward pass served several requests
    assert metric(server, "cnncodes_requests_total", route="/predict", status="415") == before_415 + 1
    assert metric(server, "cnncodes_request_seconds_count", route="/predict") >= len(images)
    assert metric(server, "cnncodes_images_rejected_total", category="empty") == before_empty + 1
    assert httpx.get(f"{server}/metrics").headers["content-type"].startswith("text/plain")


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(served):
    with running_server(served, "--batch-wait-ms", "1000", log="sigterm.log") as (url, proc):
        answer: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/predict", files=upload(served["images"][:1]), timeout=30))
        )
        request.start()
        time.sleep(0.4)  # the request now waits in the batcher's window
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(f"{url}/healthz", timeout=5)
        request.join(timeout=30)
        assert proc.wait(timeout=30) == 0
    assert answer[0].status_code == 200 and answer[0].json()["predictions"][0]["label"]


def test_a_request_still_running_when_the_grace_period_ends_gets_503_and_the_log_no_traceback(served):
    with running_server(served, "--batch-wait-ms", "5000", "--grace-seconds", "0.5", log="grace.log") as (url, proc):
        answer: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/predict", files=upload(served["images"][:1]), timeout=30))
        )
        request.start()
        time.sleep(0.4)  # the request now waits in the batcher's 5-s window, longer than the grace period
        proc.send_signal(signal.SIGTERM)
        request.join(timeout=30)
        assert proc.wait(timeout=30) == 0
    assert answer[0].status_code == 503 and "shutting down" in answer[0].json()["detail"]
    assert "Traceback" not in (served["root"] / "grace.log").read_text()


@pytest.mark.slow
def test_workers_run_as_separate_processes_sharing_the_cores(served, tmp_path):
    import psutil

    model = tmp_path / served["model"].name  # a copy, deleted while the server runs
    for path in (served["model"], served["model"].with_suffix(".json")):
        shutil.copy(path, tmp_path)
    with running_server({**served, "model": model}, "--workers", "2", log="workers.log") as (url, proc):
        response = httpx.post(f"{url}/predict", files=upload(served["images"][:3]))
        assert response.status_code == 200 and all(p["label"] for p in response.json()["predictions"])
        assert httpx.get(f"{url}/metadata").json()["threads"] == max(1, (os.cpu_count() or 1) // 2)

        def workers() -> list[psutil.Process]:
            found = []
            for child in psutil.Process(proc.pid).children():
                try:
                    if "spawn_main" in " ".join(child.cmdline()):
                        found.append(child)
                except psutil.Error:  # gone, or a zombie not yet reaped
                    pass
            return found

        def wait_for(started: int, gone: psutil.Process | None = None) -> None:
            log, deadline = served["root"] / "workers.log", time.monotonic() + 60
            while gone in workers() or log.read_text().count("Application startup complete") < started:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)

        wait_for(2)  # the first answer needs one worker: the other may still be warming up on a busy machine
        # A worker that dies is restarted by uvicorn and loads the model again: from the server's own copy.
        model.unlink()
        model.with_suffix(".json").unlink()
        killed = workers()[0]
        killed.kill()
        wait_for(3, killed)
        answers = [httpx.post(f"{url}/predict", files=upload(served["images"][:1])) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_serve_and_prepare_stop_with_one_line_on_a_bad_model(served, tmp_path):
    for command in ("serve", "prepare"):
        result = runner.invoke(app, [command, str(tmp_path / "missing.joblib")])
        assert result.exit_code == 2 and "not found" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_prepare_loads_the_model_and_says_what_it_prepared(served):
    result = runner.invoke(app, ["prepare", str(served["model"])])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"prepared {served['model']} (3 classes, 128 px input): its runtime model is")


def test_serve_without_its_extra_says_how_to_install_it(served, monkeypatch):
    monkeypatch.delitem(sys.modules, "cnncodes.serving.serve", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what `import fastapi` meets when it is not installed
    result = runner.invoke(app, ["serve", str(served["model"])])
    assert result.exit_code == 2
    assert "pip install 'cnncodes[serve]'" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_port_in_use_or_a_host_that_does_not_resolve_is_one_line_before_the_model_loads(served, monkeypatch):
    import cnncodes.serving.serve

    monkeypatch.setattr(cnncodes.serving.serve, "_load", lambda settings: pytest.fail("the model loaded first"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        for host, words in (("127.0.0.1", f"cannot listen on 127.0.0.1:{port}"), ("no-such-host.invalid", "cannot")):
            result = runner.invoke(app, ["serve", str(served["model"]), "--host", host, "--port", port])
            assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output


def test_readyz_says_not_ready_until_the_warm_up_pass_ran(served):
    """In process, without the lifespan that starts the warm-up: alive, not ready."""
    from cnncodes.serving.app import create_app
    from cnncodes.serving.predict import load_predictor
    from cnncodes.serving.settings import ServeSettings

    asgi = httpx.ASGITransport(
        app=create_app(load_predictor(served["model"]), ServeSettings(model=str(served["model"])))
    )

    async def probe() -> tuple[int, int]:
        async with httpx.AsyncClient(transport=asgi, base_url="http://test") as client:
            return (await client.get("/healthz")).status_code, (await client.get("/readyz")).status_code

    assert asyncio.run(probe()) == (200, 503)


def test_a_photo_decodes_from_its_bytes_as_from_its_file(served, tmp_path):
    """Uploaded bytes and the same file on disk give the same pixels: one decoding path, draft mode included."""
    from cnncodes.serving.predict import load_predictor

    photo = write_image(tmp_path / "photo.jpg", "circles", seed=9, size=300)
    predictor = load_predictor(served["model"])
    np.testing.assert_array_equal(predictor.pixels(photo.read_bytes()), predictor.pixels(photo))
    assert predictor.pixels(photo).shape == (128, 128, 3)


def test_uploads_that_would_decode_to_too_many_pixels_get_400_and_large_jpegs_decode_reduced(server, served):
    from PIL import Image

    from cnncodes.serving.predict import load_predictor

    side = 4_100  # 16.8 million pixels, over the default --max-pixels, in a 50-kB PNG
    png = io_bytes(Image.new("RGB", (side, side), (200, 30, 30)), "PNG")
    response = httpx.post(f"{server}/predict", content=png, headers={"content-type": "image/png"})
    assert response.status_code == 400
    assert "4100x4100 pixels to decode, over the limit of 16,000,000" in response.json()["predictions"][0]["error"]
    assert httpx.get(f"{server}/metadata").json()["limits"]["max_pixels"] == 16_000_000
    # A JPEG decodes at a reduced scale that still covers the model's 128 px: its decoded pixels are what count.
    predictor = load_predictor(served["model"])
    jpeg = io_bytes(Image.new("RGB", (1024, 1024), (30, 200, 30)), "JPEG")
    assert predictor.pixels(jpeg, max_pixels=128 * 128).shape == (128, 128, 3)
    with pytest.raises(cnncodes.data.decode.BadImage, match="1024x1024 pixels to decode"):
        predictor.pixels(io_bytes(Image.new("RGB", (1024, 1024)), "PNG"), max_pixels=128 * 128)


def test_a_client_that_leaves_mid_upload_is_counted_not_logged_as_a_server_error(server, served):
    before = metric(server, "cnncodes_requests_total", route="/predict", status="499")
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\n"
            b'Content-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n\x89PNG'
        )
    deadline = time.monotonic() + 10
    while metric(server, "cnncodes_requests_total", route="/predict", status="499") == before:
        assert time.monotonic() < deadline, "the abandoned request was not counted"
        time.sleep(0.1)
    assert "Traceback" not in (served["root"] / "server.log").read_text()


def test_health_routes_answer_head_and_the_schema_describes_uploads(server):
    assert httpx.head(f"{server}/healthz").status_code == 200
    assert httpx.head(f"{server}/readyz").status_code == 200
    schema = httpx.get(f"{server}/openapi.json").json()
    operations = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(operations) == len(set(operations))  # HEAD routes add no second operation under the same id
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["files"]["items"]["format"] == "binary"
    assert "image/*" in body


def test_a_failed_warm_up_makes_health_and_predictions_503_instead_of_hanging():
    def broken(pixels):
        raise MemoryError("onnxruntime could not allocate 2 GB")

    async def calls(client):
        for _ in range(100):
            health = await client.get("/healthz")
            if health.status_code != 200:
                break
            await asyncio.sleep(0.05)
        return (
            health,
            await client.get("/readyz"),
            await client.post("/predict", files=[("files", ("a.png", png_of(9)))]),
        )

    health, ready, predicted = in_process(fake_app(broken), calls)
    assert health.status_code == ready.status_code == predicted.status_code == 503
    assert "failed its warm-up" in health.json()["detail"] and "could not allocate" in predicted.json()["detail"]


def test_a_failed_forward_pass_fails_its_requests_and_the_server_goes_on():
    def white_fails(pixels):
        if pixels.max() == 255:
            raise RuntimeError("a kernel failed")
        return np.tile([0.25, 0.75], (len(pixels), 1))

    async def calls(client):
        while (await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)
        failed = await client.post("/predict", files=[("files", ("white.png", png_of(255)))])
        return failed, await client.post("/predict", files=[("files", ("grey.png", png_of(9)))])

    failed, served_after = in_process(fake_app(white_fails), calls)
    assert failed.status_code == 500 and "the forward pass failed: a kernel failed" in failed.json()["detail"]
    assert served_after.status_code == 200 and served_after.json()["predictions"][0]["label"] == "b"


def test_images_queued_during_a_forward_pass_do_not_wait_the_window_again():
    slow = threading.Event()

    def probabilities(pixels):
        if slow.is_set():
            time.sleep(0.5)
        return np.tile([0.25, 0.75], (len(pixels), 1))

    async def calls(client):
        while (await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)
        slow.set()

        async def post(delay: float) -> float:
            await asyncio.sleep(delay)
            await client.post("/predict", files=[("files", ("a.png", png_of(9)))])
            return time.perf_counter()

        # A waits the 3-s window, then its pass takes 0.5 s; B arrives during that pass.
        return await asyncio.gather(post(0), post(3.2))

    done_a, done_b = in_process(fake_app(probabilities, wait_ms=3000), calls)
    assert done_b - done_a < 2.0  # B's own pass (0.5 s), not another 3-s window


def test_a_cancellation_other_than_uvicorns_shutdown_stays_a_cancellation():
    def blocking(pixels):
        if pixels.max() == 255:
            time.sleep(2)
        return np.tile([0.25, 0.75], (len(pixels), 1))

    async def calls(client):
        while (await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.post("/predict", files=[("files", ("w.png", png_of(255)))]), 0.5)
        return (await client.get("/healthz")).status_code

    assert in_process(fake_app(blocking), calls) == 200


def test_workers_name_the_users_model_file_when_it_cannot_be_verified(served, tmp_path):
    shutil.copy(served["model"], tmp_path)
    model = tmp_path / served["model"].name  # without its run record
    result = runner.invoke(app, ["serve", str(model), "--workers", "2"])
    assert result.exit_code == 2 and f"{model} has no readable run record" in " ".join(result.output.split())
