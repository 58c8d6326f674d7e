"""A live server under pressure: a bounded queue, deadlines, a drain on SIGTERM, idle connections, metrics."""

from __future__ import annotations

import http.client
import math
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from .helpers import V2_MODEL, fake_app, free_port, metric, png_of, running_server, upload


@contextmanager
def live(app) -> Iterator[str]:
    """`app` on uvicorn on a free loopback port, in a thread of this process, once /readyz says so."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 30 s"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post_in_background(url: str, files) -> tuple[threading.Thread, list[httpx.Response]]:
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(httpx.post(f"{url}/predict", files=files, timeout=30)))
    thread.start()
    return thread, answer


@pytest.fixture(scope="module")
def patient(served) -> Iterator[str]:
    """A server whose first image waits 1.5 s for company, with room for one waiting image and 1-s reads."""
    with running_server(
        served,
        "--max-queue",
        "1",
        "--batch-wait-ms",
        "1500",
        "--read-timeout",
        "1",
        "--model-name",
        V2_MODEL,
        log="patient.log",
    ) as (url, _):
        yield url


def test_beyond_max_queue_a_request_gets_503_with_retry_after_at_once(patient, served):
    waiting, answer = post_in_background(patient, upload(served["images"][:1]))
    try:
        deadline = time.monotonic() + 5
        while metric(patient, "cnncodes_images_queued") < 1:
            assert time.monotonic() < deadline, "the first image never queued"
            time.sleep(0.05)
        assert metric(patient, "cnncodes_requests_in_flight") >= 2  # the waiting request and this scrape
        started = time.monotonic()
        refused = httpx.post(f"{patient}/predict", files=upload(served["images"][1:2]), timeout=30)
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "--max-queue" in refused.json()["detail"]
        image = {"content": served["images"][1].read_bytes(), "headers": {"Inference-Header-Content-Length": "0"}}
        v2 = httpx.post(f"{patient}/v2/models/{V2_MODEL}/infer", **image, timeout=30)
        assert v2.status_code == 503 and v2.headers["retry-after"] == "1" and "--max-queue" in v2.json()["error"]
    finally:
        waiting.join(timeout=30)
    assert answer[0].status_code == 200
    assert metric(patient, "cnncodes_images_queued") == 0


def test_metrics_hold_process_model_and_forward_pass_series_and_negotiate_openmetrics(patient, served):
    assert httpx.post(f"{patient}/predict", files=upload(served["images"][:1]), timeout=30).status_code == 200
    text = httpx.get(f"{patient}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["process_resident_memory_bytes"].samples[0].value > 10_000_000
    assert "python_info" in families and "python_gc_collections" in families
    assert metric(patient, "cnncodes_forward_seconds_count") >= 1
    assert metric(patient, "cnncodes_forward_seconds_sum") > 0
    [info] = families["cnncodes_model_info"].samples
    assert info.value == 1 and info.labels["name"] == served["model"].name
    assert info.labels["backbone"] == "mobilenetv2" and info.labels["precision"] == "fp32"
    assert len(info.labels["sha256"]) == 64 and info.labels["run"]
    openmetrics = httpx.get(f"{patient}/metrics", headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert httpx.get(f"{patient}/metrics").headers["content-type"].startswith("text/plain")


def test_idle_and_trickling_connections_are_closed_after_the_read_timeout(patient):
    host, port = patient.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as idle:
        started = time.monotonic()
        assert idle.recv(1024) == b""  # closed by the server, not by this 5-s timeout
        assert 0.8 < time.monotonic() - started < 4
    with socket.create_connection((host, int(port)), timeout=5) as slow:
        started, closed = time.monotonic(), False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.2 s never finishes in 1 s
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            assert time.monotonic() - started < 5
        if not closed:
            assert slow.recv(1024) == b""
        assert time.monotonic() - started < 4
    assert httpx.get(f"{patient}/healthz").status_code == 200


def test_an_idle_connection_stays_open_past_httpxs_keep_alive_expiry(server):
    """Closed at uvicorn's 5 s, idle connections raced httpx's reuse of them (up to 5 s idle): resets under load."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() and connection.sock is not None
        connection.sock.settimeout(5.5)
        with pytest.raises(TimeoutError):  # neither bytes nor a close while idle (--read-timeout is 10 s)
            connection.sock.recv(1)
        connection.sock.settimeout(10)
        connection.request("GET", "/healthz")  # the same connection still serves
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_metadata_with_a_slash_is_not_redirected_to_the_host_header(patient):
    response = httpx.get(f"{patient}/metadata/", headers={"host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers


def test_a_request_past_its_deadline_gets_504_and_the_server_goes_on():
    def white_is_slow(pixels):
        if pixels.max() == 255:
            time.sleep(1.0)
        return np.tile([0.25, 0.75], (len(pixels), 1))

    with live(fake_app(white_is_slow, timeout=0.5)) as url:
        started = time.monotonic()
        late = httpx.post(f"{url}/predict", files=[("files", ("white.png", png_of(255)))], timeout=10)
        assert late.status_code == 504 and "--timeout of 0.5 s" in late.json()["detail"]
        assert time.monotonic() - started < 0.9
        assert httpx.get(f"{url}/healthz", timeout=1).status_code == 200  # while the slow pass still runs
        time.sleep(0.8)  # the slow pass is over
        after = httpx.post(f"{url}/predict", files=[("files", ("grey.png", png_of(9)))], timeout=10)
        assert after.status_code == 200 and after.json()["predictions"][0]["label"] == "b"
        assert metric(url, "cnncodes_requests_total", route="/predict", status="504") == 1


def test_metadata_holding_a_nan_is_answered_with_null():
    record = {"run": "fake", "accuracy": math.nan, "ece": math.inf}
    with live(fake_app(lambda p: np.tile([0.5, 0.5], (len(p), 1)), record=record)) as url:
        response = httpx.get(f"{url}/metadata")
    assert response.status_code == 200
    assert response.json()["run"]["accuracy"] is None and response.json()["run"]["ece"] is None


def test_readiness_turns_503_on_sigterm_while_the_request_in_flight_finishes(served):
    args = ("--batch-wait-ms", "1500", "--drain-seconds", "1.5")
    with running_server(served, *args, log="drain.log") as (url, proc):
        waiting, answer = post_in_background(url, upload(served["images"][:1]))
        time.sleep(0.3)  # the request now waits in the batcher's window
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503 and httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        waiting.join(timeout=30)
        assert proc.wait(timeout=30) == 0
    assert answer[0].status_code == 200 and answer[0].json()["predictions"][0]["label"]
