"""How `cnncodes extract` scales: time per stage and peak memory at 20,000 and 200,000 images.

Synthetic images (40×40 PNGs in 10 classes, each distinct, one in 500 a near-copy of
another), MobileNetV2 at 32 px with `--weights none` (the same speed as real weights) and a
warm ONNX cache, as in issue #12. Every extract runs cold (a new --out) in a fresh
subprocess, on the local engine and on the Ray engine (a local Ray of this machine's
CPUs, started by the run: its start-up is the "engine" stage); sizes and engines are
interleaved round by round, and the peak RSS is the driver process's (Ray's actors are
processes of their own). Then `split.group_duplicates` alone on 1,000,000 random hashes
with planted near-duplicates, in its own subprocess.

    .venv/bin/python scripts/bench_scale.py [--sizes 20000,200000] [--engines local,ray] [--rounds 1]

With `--codes 2000,10000,50000` it measures instead the classifiers on synthetic codes of
dimension 1280 (10 classes, memory-mapped .npy): `sgd` against `logreg` and `linear-svm`, all with
`--normalize standard --cv 3`, sizes interleaved, each fit in a fresh subprocess: wall time,
peak RSS, and peak anonymous RSS (RSS counts the memory-mapped codes' pages, which the
kernel can drop). A kind that passes `--fit-timeout` seconds is stopped and not run on larger sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CLASSES = 10
STAGES = ("discover", "engine", "check", "duplicates", "split", "codes", "publish")

EXTRACT = """
import json, resource, sys, time
import cnncodes
started = time.perf_counter()
spec = cnncodes.ExtractorSpec.create(backbone="mobilenetv2", weights="none", image_size=32)
result = cnncodes.extract(sys.argv[1], sys.argv[2], spec, engine=sys.argv[3], progress=False)
wall = time.perf_counter() - started
meta = json.load(open(f"{sys.argv[2]}/meta.json"))
print(json.dumps({"wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images": result.n_images, "stages": meta["stage_seconds"]}))
"""

GROUPING = """
import json, resource, sys, time
import numpy as np
from cnncodes.data.split import group_duplicates
n = int(sys.argv[1])
rng = np.random.default_rng(0)
bits = rng.integers(0, 2**64, size=n, dtype=np.uint64)
copies = rng.integers(0, n, n // 100)
noise = np.zeros(len(copies), dtype=np.uint64)
for _ in range(4):
    noise |= np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
bits[rng.integers(0, n, len(copies))] = bits[copies] ^ noise
hashes = [f"{b:016x}" for b in bits.tolist()]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
groups = group_duplicates(hashes, 6)
print(json.dumps({"seconds": time.perf_counter() - started, "groups": len(np.unique(groups)),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": before}))
"""

FIT = """
import json, resource, sys, threading, time
import numpy as np
from cnncodes.classify.estimator import CodesClassifier
X, y = np.load(sys.argv[1], mmap_mode="r"), np.load(sys.argv[2])
peak = [0]
def watch():
    while True:
        with open("/proc/self/status") as status:
            anon = next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))
        peak[0] = max(peak[0], anon)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
started = time.perf_counter()
model = CodesClassifier(kind=sys.argv[3], normalize="standard", cv=3, n_jobs=1).fit_rows(X, y, np.arange(len(y)))
print(json.dumps({"seconds": time.perf_counter() - started, "cv_score": model.cv_score_,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon_mb": peak[0] / 1024}))
"""
DIMENSION = 1280


def make_codes(root: Path, n: int) -> tuple[Path, Path]:
    """`n` synthetic non-negative codes of 10 noisy classes, written in chunks to a .npy, and their labels."""
    codes, labels = root / f"codes-{n}.npy", root / f"labels-{n}.npy"
    if labels.is_file():
        return codes, labels
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    centres = rng.normal(0, 1, (CLASSES, DIMENSION)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    X = np.lib.format.open_memmap(codes, mode="w+", dtype=np.float32, shape=(n, DIMENSION))
    for start in range(0, n, 5000):
        part = y[start : start + 5000]
        X[start : start + len(part)] = np.maximum(centres[part] + rng.normal(0, 4, (len(part), DIMENSION)), 0)
    X.flush()
    np.save(labels, y)
    return codes, labels


def bench_classifiers(sizes: list[int], root: Path, timeout: float) -> list[dict]:
    """sgd, logreg and linear-svm fit times, sizes interleaved; a kind that times out is not run on larger sizes."""
    results: list[dict] = []
    stopped: set[str] = set()
    for n in sizes:
        codes, labels = make_codes(root, n)
        for kind in ("sgd", "logreg", "linear-svm"):
            if kind in stopped:
                results.append({"codes": n, "kind": kind, "skipped": True})
                continue
            try:
                done = subprocess.run(
                    [sys.executable, "-c", FIT, str(codes), str(labels), kind],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=timeout,
                )
                results.append({"codes": n, "kind": kind, **json.loads(done.stdout.strip().splitlines()[-1])})
            except subprocess.TimeoutExpired:
                stopped.add(kind)
                results.append({"codes": n, "kind": kind, "timeout": timeout})
            print(json.dumps(results[-1]), flush=True)
    return results


def classifier_table(results: list[dict]) -> str:
    lines = ["| codes | classifier | fit | peak RSS | peak anonymous RSS | held-out accuracy |", "|---" * 6 + "|"]
    for row in results:
        if "seconds" in row:
            found = f"{row['seconds']:.1f} s | {row['rss_mb']:.0f} MB | {row['anon_mb']:.0f} MB | {row['cv_score']:.3f}"
        elif "timeout" in row:
            found = f"stopped after {row['timeout']:.0f} s | | |"
        else:
            found = "not run (stopped at a smaller size) | | |"
        lines.append(f"| {row['codes']:,} | {row['kind']} | {found} |")
    return "\n".join(lines)


def _write_images(root: Path, start: int, stop: int) -> None:
    for i in range(start, stop):
        source = i - 1 if i % 500 == 499 else i  # a near-copy of the image before it
        rng = np.random.default_rng(source)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((40, 40), Image.Resampling.BILINEAR), dtype=np.int16)
        if source != i:
            pixels = pixels + 3
        folder = root / f"class{source % CLASSES}"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:07d}.png")


def make_images(root: Path, n: int) -> Path:
    """`n` synthetic images under `root`, made once and kept for later runs."""
    if (root / "done").is_file():
        return root
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    step = 5000
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(
            pool.map(
                _write_images,
                [root] * len(range(0, n, step)),
                range(0, n, step),
                [min(s + step, n) for s in range(0, n, step)],
            )
        )
    (root / "done").touch()
    return root


def run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "cnncodes-bench-scale")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--codes", help="measure sgd, logreg and linear-svm on this many codes instead, e.g. 2000,10000,50000"
    )
    parser.add_argument("--fit-timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.codes:
        found = bench_classifiers([int(n) for n in args.codes.split(",")], args.data / "codes", args.fit_timeout)
        if args.json:
            args.json.write_text(json.dumps({"classifiers": found}, indent=2) + "\n")
        print(classifier_table(found))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = args.engines.split(",")
    datasets = {n: make_images(args.data / f"images-{n}", n) for n in sizes}
    run(EXTRACT, str(datasets[sizes[0]]), str(args.data / "warm"), "local")  # the ONNX conversion, once
    results = []
    for r in range(args.rounds):
        for n in sizes:
            for engine in engines:
                out = args.data / f"out-{n}-{engine}-{r}-{time.time_ns()}"
                measured = run(EXTRACT, str(datasets[n]), str(out), engine)
                results.append({"images": n, "engine": engine, "round": r, **measured})
                print(json.dumps(results[-1]), flush=True)
    grouping = run(GROUPING, str(args.hashes)) if args.hashes else None
    if grouping:
        print(json.dumps({"grouping": grouping}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"extract": results, "grouping": grouping}, indent=2) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| images | engine | " + " | ".join(STAGES) + " | whole extract | images/s | peak RSS (driver) |",
        "|---" * (len(STAGES) + 5) + "|",
    ]
    for row in results:
        stages = " | ".join(f"{row['stages'].get(s, 0):.1f}" for s in STAGES)
        lines.append(
            f"| {row['images']:,} | {row['engine']} | {stages} | {row['wall']:.1f} s | "
            f"{row['images'] / row['wall']:.0f} | {row['rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
