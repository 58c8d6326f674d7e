"""Load test of `cnncodes serve` on this machine, with `cnncodes predict` measured in the same run.

A MobileNetV2 (ImageNet weights, 224 px) logreg bundle fitted on a few hundred images of
../shared/datasets/cats_dogs_horses_humans (or --model), served on 127.0.0.1; CLIENTS
concurrent httpx clients send REQUESTS requests of one image each, CORRUPT of them a damaged
image (truncated, random bytes or empty). Bounded by --max-seconds as well as by count.
Prints requests/s, images/s, latency percentiles, the status histogram, transport errors,
the server's RSS after warm-up and at the end, and `predict`'s batched images/s on the same
model and images, measured before and after the load (the machine may be shared).

    .venv/bin/python scripts/load_test.py [--requests 2000] [--clients 32] [--corrupt 0.1]
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
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "datasets" / "cats_dogs_horses_humans"
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
CNNCODES = Path(sys.executable).with_name("cnncodes")


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
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(CNNCODES), "serve", str(model), "--port", str(port), "--no-access-log", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
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


async def hammer(url: str, work: list[tuple[str, bytes, bool]], clients: int, max_seconds: float) -> dict:
    """Send `work` with `clients` concurrent connections; per-request status and latency, transport errors."""
    results: list[tuple[int, float, bool]] = []
    errors: Counter[str] = Counter()
    queue = iter(work)
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            for name, data, corrupt in queue:
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                try:
                    response = await client.post("/predict", files=[("files", (name, data))])
                    results.append((response.status_code, time.perf_counter() - started, corrupt))
                except httpx.TransportError as e:
                    errors[type(e).__name__] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"results": results, "errors": errors, "seconds": seconds}


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
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="A bundle or .keras model (default: fit one, see above).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-load-test"))
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--corrupt", type=float, default=0.10)
    parser.add_argument("--warmup", type=int, default=100, help="Requests before the measured ones.")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--predict-images", type=int, default=416)
    parser.add_argument("--serve-args", default="", help="Extra options of `cnncodes serve`, e.g. '--max-batch 16'.")
    args = parser.parse_args()

    model = args.model or fit_model(args.work, args.train_images)
    images = sorted(DATA.rglob("*.jpg"))
    predict_before = predict_rate(model, images[: args.predict_images])

    port = free_port()
    server = start_server(model, port, args.work / "server.log", args.serve_args.split())
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(hammer(url, payloads(images, args.warmup, 0.0, 1), args.clients, args.max_seconds))
        rss_warm, batches_warm = rss_mb(server.pid), batches(url)
        run = asyncio.run(hammer(url, payloads(images, args.requests, args.corrupt, 0), args.clients, args.max_seconds))
        rss_end, batches_end = rss_mb(server.pid), batches(url)
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=60)
    predict_after = predict_rate(model, images[: args.predict_images])

    results, seconds = run["results"], run["seconds"]
    statuses = Counter(status for status, _, _ in results)
    latencies = [1000 * t for _, t, _ in results]
    corrupt_sent = sum(1 for _, _, corrupt in results if corrupt)
    corrupt_400 = sum(1 for status, _, corrupt in results if corrupt and status == 400)
    images_per_s = statuses[200] / seconds
    passes, batched = batches_end[0] - batches_warm[0], batches_end[1] - batches_warm[1]
    predict_mean = (predict_before + predict_after) / 2
    rows = [
        ("requests answered / sent", f"{len(results)} / {args.requests} ({args.clients} clients)"),
        (
            "transport errors (dropped connections)",
            str(sum(run["errors"].values())) + (f" {dict(run['errors'])}" if run["errors"] else ""),
        ),
        ("status histogram", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))),
        ("corrupt uploads answered 400", f"{corrupt_400} / {corrupt_sent}"),
        ("wall time", f"{seconds:.1f} s"),
        ("requests/s", f"{len(results) / seconds:.1f}"),
        ("images/s (predicted)", f"{images_per_s:.1f}"),
        ("forward passes, mean images per pass", f"{passes:.0f}, {batched / passes:.1f}"),
        ("latency p50 / p95 / p99", " / ".join(f"{percentile(latencies, q):.0f} ms" for q in (50, 95, 99))),
        ("server RSS after warm-up / at end", f"{rss_warm:.0f} MB / {rss_end:.0f} MB ({rss_end - rss_warm:+.0f} MB)"),
        ("`predict` batched images/s (before / after)", f"{predict_before:.1f} / {predict_after:.1f}"),
        ("serve images/s / predict images/s", f"{images_per_s / predict_mean:.2f}"),
        ("server exit code after SIGTERM", str(exit_code)),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
