"""Peak memory and throughput of a real `cnncodes serve` process at several `--max-batch` values.

For each model and each max batch, a server is started on a free loopback port; once /readyz
answers (the warm-up ran every batch size up to the max), REQUESTS requests of exactly
max-batch images each are sent one after the other, so every forward pass is a full batch.
The peak is the kernel's high-water mark of the process's resident memory (VmHWM in
/proc/PID/status), warm-up included: what a pod's memory limit must hold. Prints a markdown
table; `--json` also writes the rows, with the command and the date, for deploy/serve-memory.json
(which tests/test_deploy.py holds the manifests' memory limits to).

    .venv/bin/python scripts/bench_serve_memory.py MODEL.joblib [MODEL.joblib ...] \
        [--max-batch 4 8 16 32] [--requests 6] [--threads 2] [--json deploy/serve-memory.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "datasets" / "cats_dogs_horses_humans"
CNNCODES = Path(sys.executable).with_name("cnncodes")
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and its peak so far (VmHWM), in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> float:
    """Seconds until /readyz answers 200 (the model loaded and warmed up)."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server ended with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def measure(model: Path, max_batch: int, images: list[Path], args: argparse.Namespace, log: Path) -> dict:
    """One server of `model` at `max_batch`: RSS after the warm-up, peak RSS and images/s at full batches."""
    port = free_port()
    command = [str(CNNCODES), "serve", str(model), "--port", str(port), "--max-batch", str(max_batch)]
    command += ["--threads", str(args.threads), "--no-access-log", "--max-bytes", str(200 * MIB)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        start_seconds = wait_ready(url, proc, log)
        warmed = memory_kib(proc.pid)
        files = [("files", (p.name, p.read_bytes())) for p in (images * max_batch)[:max_batch]]
        start = time.monotonic()
        with httpx.Client(timeout=600) as client:
            for _ in range(args.requests):
                answer = client.post(f"{url}/predict", files=files)
                answer.raise_for_status()
        seconds = time.monotonic() - start
        end = memory_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "model": model.name,
        "input_sizes": input_sizes(model),
        "max_batch": max_batch,
        "start_seconds": round(start_seconds, 1),
        "rss_after_warm_up_mib": round(warmed["VmRSS"] / 1024),
        "rss_end_mib": round(end["VmRSS"] / 1024),
        "peak_rss_mib": round(end["VmHWM"] / 1024),
        "images_per_second": round(args.requests * max_batch / seconds, 1),
    }


def input_sizes(model: Path) -> list[int]:
    """The input sizes of the model's codes (one, or the scales whose codes it averages), from its bundle."""
    from cnncodes.runs.bundle import load_bundle

    extractor = load_bundle(model)[1]["extractor"]
    return list(extractor.get("scales") or [extractor["image_size"]])


def table(rows: list[dict]) -> str:
    lines = [
        "| model (input px) | --max-batch | RSS after warm-up (MiB) | peak RSS (MiB) | images/s |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        sizes = ", ".join(map(str, r["input_sizes"]))
        lines.append(
            f"| {r['model']} ({sizes}) | {r['max_batch']} | {r['rss_after_warm_up_mib']} | "
            f"{r['peak_rss_mib']} | {r['images_per_second']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help=".joblib bundles (prepared: `cnncodes prepare`)")
    parser.add_argument("--max-batch", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--requests", type=int, default=6, help="requests of max-batch images each, after warm-up")
    parser.add_argument("--threads", type=int, default=2, help="the server's threads (a pod's CPU limit)")
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of the JPEG photos sent")
    parser.add_argument("--json", type=Path, help="also write the rows, command and date here")
    args = parser.parse_args()
    images = sorted(args.images.rglob("*.jpg"))[:64]
    if not images:
        raise SystemExit(f"no .jpg files under {args.images}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            for max_batch in args.max_batch:
                rows.append(measure(model, max_batch, images, args, Path(scratch) / "server.log"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        command = shlex.join(["python", "scripts/bench_serve_memory.py", *sys.argv[1:]])
        measured = {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} cores, {args.threads} server threads",
            "rows": rows,
        }
        args.json.write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()
