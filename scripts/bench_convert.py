"""First use of a backbone: cnncodes's ONNX conversion against Keras's bare `model.export`.

For each backbone (untrained weights, its default input size), in fresh processes, with
rounds that interleave the two so a slow spell of the shared machine hits both alike:
  bare      build the Keras extractor, call it once (Keras exports only called models) and
            `model.export(format="onnx")`, nothing else;
  cnncodes  `ExtractorSpec.runner` on an empty cache: the conversion in a child process,
            the check against Keras on the probe batch, the cached file, the ONNX session.
Whole-process wall time, and the peak RSS of the whole process tree (the sum over the
process and its children, sampled every 20 ms with psutil). Median of --repeats rounds.

    .venv/bin/python scripts/bench_convert.py [--backbones mobilenetv2,resnet50,vgg16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BARE = """
import sys, numpy as np, cnncodes
from cnncodes.nets.backbones import get_backbone
size = get_backbone(sys.argv[1]).default_size  # one size
spec = cnncodes.ExtractorSpec.create(backbone=sys.argv[1], weights="none", image_size=size)
model = spec.build(spec.recorded_weights)
model.predict_on_batch(np.zeros((1, *model.input_shape[1:]), np.uint8))  # Keras exports only called models
model.export(sys.argv[2] + "/model.onnx", format="onnx", verbose=False)
"""
CNNCODES = """
import sys, cnncodes
from cnncodes.runtime.runners import OnnxRunner
from cnncodes.nets.backbones import get_backbone
size = get_backbone(sys.argv[1]).default_size  # one size
spec = cnncodes.ExtractorSpec.create(backbone=sys.argv[1], weights="none", image_size=size)
assert isinstance(spec.runner(spec.recorded_weights), OnnxRunner)
"""


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def measure(script: str, backbone: str) -> tuple[float, float]:
    """Wall seconds and peak process-tree RSS (MB) of one fresh run with an empty cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"CNNCODES_CACHE_DIR": tmp}
        started = time.perf_counter()
        log = Path(tmp) / "stderr.log"  # a file, not a pipe: a pipe nobody reads while polling can fill and block
        with log.open("w") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", script, backbone, tmp], env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
            watched, peak = psutil.Process(child.pid), 0
            while child.poll() is None:
                try:
                    peak = max(peak, tree_rss(watched))
                except psutil.NoSuchProcess:  # it ended between poll() and the measurement
                    break
                time.sleep(0.02)
            child.wait()
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"{backbone} failed:\n{log.read_text()[-3000:]}")
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mobilenetv2,resnet50,vgg16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# cold conversion, untrained weights, default size, median of {args.repeats} interleaved rounds\n")
    print("| backbone | bare export s | cnncodes s | time ratio | bare export peak RSS | cnncodes peak RSS (tree) |")
    print("|---|---|---|---|---|---|")
    for backbone in args.backbones.split(","):
        rounds = [(measure(BARE, backbone), measure(CNNCODES, backbone)) for _ in range(args.repeats)]
        bare_s, ours_s = (statistics.median(r[i][0] for r in rounds) for i in (0, 1))
        bare_mb, ours_mb = (statistics.median(r[i][1] for r in rounds) for i in (0, 1))
        print(
            f"| {backbone} | {bare_s:.1f} | {ours_s:.1f} | {ours_s / bare_s:.2f} "
            f"| {bare_mb:.0f} MB | {ours_mb:.0f} MB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
