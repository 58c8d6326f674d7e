"""Load test of `cnncodes serve` on this machine: both inference routes, a bounded queue, slow clients.

A MobileNetV2 (ImageNet weights, 224 px) logreg bundle fitted on a few hundred images of
../shared/datasets/cats_dogs_horses_humans (or --model), served on 127.0.0.1 with
`--max-queue` low enough that the bound is hit. Main run: CLIENTS concurrent httpx clients send
REQUESTS requests of one image each, CORRUPT of them a damaged image (truncated, random bytes or
empty), in BLOCKS blocks that alternate between `POST /predict` (multipart) and the Open
Inference Protocol's `POST /v2/models/NAME/infer` (the image as the whole body,
`Inference-Header-Content-Length: 0`), so the machine's load weighs on both routes alike. A
client told 503 waits its Retry-After before its next request. Then the slow-clients run: the
same clients send SLOW_REQUESTS more to /predict in SLOW_BLOCKS blocks; during every other one,
SLOW_CLIENTS connections send half a request, or a request a byte at a time, and wait for the
server to close them (its `--read-timeout`), so the blocks without them are the control.

Prints a markdown table: the status histogram of each route, the responses other than 200, 400
and 503-with-Retry-After, transport errors, latency (p99 of the 200s against `--timeout`),
images/s of each route, the slow connections' fate, the server's RSS after warm-up and at the
end, the load average at start and end, and `predict`'s batched images/s on the same model and
images, measured before and after the load (the machine may be shared).

    .venv/bin/python scripts/load_test.py [--requests 3000] [--clients 64] [--max-queue 16]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "datasets" / "cats_dogs_horses_humans"
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
CNNCODES = Path(sys.executable).with_name("cnncodes")
MODEL_NAME = "animals"  # the served model's name on the V2 routes
PREDICT, V2 = "/predict", f"/v2/models/{MODEL_NAME}/infer"


def fit_model(work: Path, n_images: int) -> Path:
    """A logreg bundle on every other image of the dataset, up to `n_images` (made once per work folder)."""
    model = work / "models" / "mobilenetv2-out_relu-logreg.joblib"
    if model.exists():
        return model
    images = sorted(DATA.rglob("*.jpg"))[::2][:n_images]
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *((str(p), p.parent.name) for p in images)])
    for command in (
        ["extract", str(work / "train.csv"), "--out", str(work / "features"), "--image-size", "224", "--quiet"],
        ["fit-svm", str(work / "features"), "--out", str(work / "models"), "--classifier", "logreg", "--quiet"],
    ):
        subprocess.run([str(CNNCODES), *command], check=True)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    command = [str(CNNCODES), "serve", str(model), "--port", str(port), "--model-name", MODEL_NAME, "--no-access-log"]
    with open(log, "w") as out:
        proc = subprocess.Popen([*command, *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server stopped: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server not ready in 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batches(url: str) -> tuple[float, float]:
    """(forward passes, images in them) so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in family.samples
    }
    return samples["cnncodes_batch_images_count"], samples["cnncodes_batch_images_sum"]


def payloads(images: list[Path], n: int, corrupt: float, seed: int) -> list[tuple[str, bytes, bool]]:
    """(filename, bytes, is_corrupt) of each request, in order."""
    rng = random.Random(seed)
    good = [(p.name, p.read_bytes()) for p in images]
    out = []
    for i in range(n):
        name, data = good[i % len(good)]
        if rng.random() < corrupt:
            data = rng.choice([data[: len(data) // 3], rng.randbytes(len(data)), b""])
            out.append((f"damaged-{name}", data, True))
        else:
            out.append((name, data, False))
    return out


@dataclass
class Answer:
    """One request's route, status, latency in seconds, whether its image was damaged, and its Retry-After."""

    route: str
    status: int
    seconds: float
    corrupt: bool
    retry_after: str | None


@dataclass
class Tally:
    """The answers of some runs, their transport errors (kind and seconds taken), and the seconds each route took."""

    answers: list[Answer] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: {PREDICT: 0.0, V2: 0.0})


async def send(client: httpx.AsyncClient, route: str, name: str, data: bytes) -> httpx.Response:
    if route == PREDICT:
        return await client.post(route, files=[("files", (name, data))])
    headers = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}
    return await client.post(route, content=data, headers=headers)


async def hammer(url: str, route: str, work: list[tuple[str, bytes, bool]], clients: int, tally: Tally) -> None:
    """Send `work` to `route` with `clients` concurrent connections; a client told 503 waits its Retry-After."""
    queue = iter(work)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            for name, data, corrupt in queue:
                started = time.perf_counter()
                try:
                    response = await send(client, route, name, data)
                except httpx.TransportError as e:
                    tally.errors[f"{type(e).__name__} after {time.perf_counter() - started:.1f} s"] += 1
                    continue
                retry_after = response.headers.get("retry-after")
                tally.answers.append(
                    Answer(route, response.status_code, time.perf_counter() - started, corrupt, retry_after)
                )
                if response.status_code == 503 and retry_after is not None:
                    await asyncio.sleep(float(retry_after))

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        tally.seconds[route] += time.perf_counter() - started


async def alternating(url: str, work: list[tuple[str, bytes, bool]], clients: int, blocks: int) -> Tally:
    """`work` in `blocks` consecutive blocks, alternately to /predict and to the V2 route."""
    tally, size = Tally(), -(-len(work) // blocks)
    for block in range(blocks):
        await hammer(url, (PREDICT, V2)[block % 2], work[block * size : (block + 1) * size], clients, tally)
    return tally


@dataclass
class SlowConnection:
    """How one slow connection ended: closed by the server (or not, within `limit`), after `seconds`."""

    kind: str
    closed: bool
    seconds: float


async def slow_connection(host: str, port: int, kind: str, image: bytes, limit: float) -> SlowConnection:
    """Send half a request ("half"), or a request a byte every 0.2 s ("trickle"), until the server closes."""
    body = b"--x\r\nContent-Disposition: form-data; name=files; filename=a.jpg\r\n\r\n" + image + b"\r\n--x--\r\n"
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if kind == "half":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            closed = await asyncio.wait_for(reader.read(65536), limit) == b""
        else:
            closed = False
            for byte in head + body:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    closed = await asyncio.wait_for(reader.read(65536), 0.2) == b""
                    break  # anything but a close is an answer to an unfinished request
                except TimeoutError:
                    if time.perf_counter() - started > limit:
                        break
    except (ConnectionError, TimeoutError) as e:
        closed = isinstance(e, ConnectionError)
    finally:
        writer.close()
    return SlowConnection(kind, closed, time.perf_counter() - started)


async def with_slow_clients(
    url: str, work: list[tuple[str, bytes, bool]], clients: int, slow: int, blocks: int, limit: float
) -> tuple[Tally, Tally, list[SlowConnection]]:
    """`work` to /predict in `blocks` blocks, every other one while `slow` connections, half of each kind, are
    opened one after another until its requests are answered: (the answers without, with, how those ended)."""
    host, port = url.removeprefix("http://").split(":")
    image = work[0][1]
    control, loaded, ended, size = Tally(), Tally(), [], -(-len(work) // blocks)

    async def slow_client(kind: str, done: asyncio.Event) -> None:
        while not done.is_set():
            ended.append(await slow_connection(host, int(port), kind, image, limit))

    async def load(block: list[tuple[str, bytes, bool]], done: asyncio.Event) -> None:
        await hammer(url, PREDICT, block, clients, loaded)
        done.set()

    for index in range(blocks):
        block = work[index * size : (index + 1) * size]
        if index % 2 == 0:
            await hammer(url, PREDICT, block, clients, control)
            continue
        done = asyncio.Event()
        await asyncio.gather(load(block, done), *(slow_client(("half", "trickle")[i % 2], done) for i in range(slow)))
    return control, loaded, ended


def predict_rate(model: Path, images: list[Path]) -> float:
    """`predict`'s batched images/s: the time of all images less that of one batch (model loading, warm-up)."""
    from cnncodes.serving.predict import predict

    def timed(paths: list[Path]) -> float:
        started = time.perf_counter()
        predict(model, paths, batch_size=32, progress=False)
        return time.perf_counter() - started

    small, full = timed(images[:32]), timed(images)
    return (len(images) - 32) / (full - small)


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def histogram(answers: list[Answer]) -> str:
    return ", ".join(f"{s}: {n}" for s, n in sorted(Counter(a.status for a in answers).items()))


def latencies(answers: list[Answer]) -> str:
    """p50 / p95 / p99 of the accepted (200) requests."""
    accepted = [1000 * a.seconds for a in answers if a.status == 200]
    return " / ".join(f"{percentile(accepted, q):.0f} ms" for q in (50, 95, 99))


def errors(tally: Tally) -> str:
    return str(sum(tally.errors.values())) + (f" {dict(tally.errors)}" if tally.errors else "")


def main_rows(tally: Tally, sent: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The main run's measures, each route apart where they can differ."""
    answers = tally.answers
    unexpected = [a for a in answers if a.status not in (200, 400, 503)]
    bare_503 = [a for a in answers if a.status == 503 and a.retry_after is None]
    accepted_p99 = percentile([1000 * a.seconds for a in answers if a.status == 200], 99)
    rate = {
        route: sum(a.status == 200 for a in answers if a.route == route) / tally.seconds[route]
        for route in (PREDICT, V2)
    }
    rows = [
        ("requests answered / sent", f"{len(answers)} / {sent} ({args.clients} clients, {args.blocks} blocks)"),
        ("transport errors (dropped connections)", errors(tally)),
        ("responses other than 200, 400, 503", f"{len(unexpected)} {histogram(unexpected)}".strip()),
        ("503 without Retry-After", str(len(bare_503))),
        ("accepted (200) p99 vs `--timeout`", f"{accepted_p99:.0f} ms vs {1000 * args.timeout:.0f} ms"),
    ]
    for route in (PREDICT, V2):
        mine = [a for a in answers if a.route == route]
        damaged = [a for a in mine if a.corrupt]
        rows += [
            (f"`{route}` status histogram", histogram(mine)),
            (
                f"`{route}` damaged images answered 400 / not refused 503",
                f"{sum(a.status == 400 for a in damaged)} / {sum(a.status != 503 for a in damaged)}",
            ),
            (f"`{route}` latency of 200s p50 / p95 / p99", latencies(mine)),
            (f"`{route}` images/s (200s / its blocks' {tally.seconds[route]:.1f} s)", f"{rate[route]:.1f}"),
        ]
    rows.append(("V2 images/s / `/predict` images/s", f"{rate[V2] / rate[PREDICT]:.2f}"))
    return rows


def slow_rows(
    control: Tally, loaded: Tally, ended: list[SlowConnection], args: argparse.Namespace
) -> list[tuple[str, str]]:
    """The slow-clients run against its control: the fast clients' answers, and how the slow connections ended."""
    rows = []
    for name, tally in (("without", control), ("with", loaded)):
        rate = sum(a.status == 200 for a in tally.answers) / tally.seconds[PREDICT]
        rows += [
            (f"{name} slow clients: status histogram", histogram(tally.answers)),
            (f"{name} slow clients: transport errors", errors(tally)),
            (f"{name} slow clients: latency of 200s p50 / p95 / p99", latencies(tally.answers)),
            (f"{name} slow clients: images/s", f"{rate:.1f}"),
        ]
    for kind in ("half", "trickle"):
        mine = [c for c in ended if c.kind == kind]
        closed = [c.seconds for c in mine if c.closed]
        span = f", after {min(closed):.1f}–{max(closed):.1f} s" if closed else ""
        label = {"half": "half a request", "trickle": "a byte every 0.2 s"}[kind]
        rows.append(
            (
                f"slow connections sending {label}: closed by the server / opened",
                f"{len(closed)} / {len(mine)}{span} (`--read-timeout` {args.read_timeout:g} s)",
            )
        )
    return rows


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="A bundle or .keras model (default: fit one, see above).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-load-test"))
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--corrupt", type=float, default=0.10)
    parser.add_argument("--blocks", type=int, default=12, help="Blocks of the main run, alternating the two routes.")
    parser.add_argument("--warmup", type=int, default=128, help="Requests before the measured ones.")
    parser.add_argument("--max-queue", type=int, default=16, help="`serve --max-queue`: low enough to be hit.")
    parser.add_argument("--timeout", type=float, default=30.0, help="`serve --timeout`, the deadline of a request.")
    parser.add_argument("--read-timeout", type=float, default=10.0, help="`serve --read-timeout`.")
    parser.add_argument("--slow-requests", type=int, default=1000, help="Requests of the slow-clients run.")
    parser.add_argument("--slow-clients", type=int, default=16)
    parser.add_argument("--slow-blocks", type=int, default=4, help="Blocks of it, every other one with slow clients.")
    parser.add_argument("--predict-images", type=int, default=416)
    parser.add_argument("--serve-args", default="", help="Other options of `cnncodes serve`, e.g. '--max-batch 16'.")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    load_start = os.getloadavg()
    model = args.model or fit_model(args.work, args.train_images)
    images = sorted(DATA.rglob("*.jpg"))
    predict_before = predict_rate(model, images[: args.predict_images])

    port = free_port()
    options = [
        "--max-queue",
        str(args.max_queue),
        "--timeout",
        str(args.timeout),
        "--read-timeout",
        str(args.read_timeout),
    ]
    args.work.mkdir(parents=True, exist_ok=True)
    server = start_server(model, port, args.work / "server.log", [*options, *args.serve_args.split()])
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(alternating(url, payloads(images, args.warmup, 0.0, 1), args.clients, 2))
        rss_warm, batches_warm = rss_mb(server.pid), batches(url)
        run = asyncio.run(alternating(url, payloads(images, args.requests, args.corrupt, 0), args.clients, args.blocks))
        rss_run, batches_run = rss_mb(server.pid), batches(url)
        slow_work = payloads(images, args.slow_requests, args.corrupt, 2)
        limit = 3 * args.read_timeout + 5
        control, loaded, ended = asyncio.run(
            with_slow_clients(url, slow_work, args.clients, args.slow_clients, args.slow_blocks, limit)
        )
        rss_end = rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    predict_after = predict_rate(model, images[: args.predict_images])
    load_end = os.getloadavg()

    passes, batched = batches_run[0] - batches_warm[0], batches_run[1] - batches_warm[1]
    predict_images_s = sum(a.status == 200 for a in run.answers if a.route == PREDICT) / run.seconds[PREDICT]
    rows = [
        *main_rows(run, args.requests, args),
        ("forward passes, mean images per pass", f"{passes:.0f}, {batched / passes:.1f}"),
        ("`predict` batched images/s (before / after)", f"{predict_before:.1f} / {predict_after:.1f}"),
        (
            "`/predict` images/s / `predict` images/s",
            f"{predict_images_s / ((predict_before + predict_after) / 2):.2f}",
        ),
    ]
    print(table(rows), end="\n\n")
    print(table(slow_rows(control, loaded, ended, args)), end="\n\n")
    print(
        table(
            [
                (
                    "server RSS after warm-up / main run / slow run",
                    f"{rss_warm:.0f} / {rss_run:.0f} / {rss_end:.0f} MB ({rss_end - rss_warm:+.0f} MB)",
                ),
                ("load average (1 min) at start / end", f"{load_start[0]:.1f} / {load_end[0]:.1f}"),
                ("server exit code after SIGTERM", str(exit_code)),
            ]
        )
    )


if __name__ == "__main__":
    main()
