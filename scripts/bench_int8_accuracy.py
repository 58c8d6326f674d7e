"""What int8 costs in accuracy: fp32 against int8 MobileNetV2 codes on Flowers-17, over 5 splits.

For each seed (5 duplicate-aware splits, `extract --seed 0..4`): ImageNet MobileNetV2 codes at
its default size with `--precision fp32` and `--precision int8` (calibrated on 128 train images
of that split), then `fit-svm` with its defaults (every classifier, 5-fold CV on train+val) on
each; test accuracy per classifier, mean ± sd over the seeds, and the int8 codes' recorded
agreement with fp32 codes. Prints the README table.

    .venv/bin/python scripts/bench_int8_accuracy.py [--work /tmp/cnncodes-int8] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLOWERS = SHARED / "datasets" / "oxford17flowers"
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PRECISIONS = ("fp32", "int8")


def one_split(work: Path, seed: int, precision: str) -> tuple[dict[str, float], dict | None]:
    """Test accuracy of each default classifier on one split's codes, and int8's recorded agreement."""
    import cnncodes
    from cnncodes.classifiers import fit_svm

    features, models = work / f"seed{seed}-{precision}" / "features", work / f"seed{seed}-{precision}" / "models"
    cnncodes.extract(FLOWERS, features, seed=seed, precision=precision, progress=False)
    records = fit_svm(features, models, progress=False)
    quantization = json.loads((features / "meta.json").read_text())["extractor"].get("quantization")
    return {r["classifier"]: r["accuracy"] for r in records}, quantization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-int8"))
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    scores: dict[tuple[str, str], list[float]] = {}
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            accuracy, quantization = one_split(args.work, seed, precision)
            for kind, value in accuracy.items():
                scores.setdefault((kind, precision), []).append(100 * value)
            if quantization:
                a = quantization["agreement"]
                print(
                    f"seed {seed}: int8 {quantization['method']}, per-channel {quantization['per_channel']}, "
                    f"fp32 layers {quantization['fp32_layers'] or 'none'}; cosine with fp32 mean {a['mean']:.4f}, "
                    f"min {a['min']:.4f}",
                    flush=True,
                )
            print(
                f"seed {seed} {precision}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in accuracy.items()), flush=True
            )
    print(f"\n| classifier | fp32 test accuracy | int8 test accuracy | int8 - fp32 (mean over {args.seeds} splits) |")
    print("|---|---|---|---|")
    for kind in sorted({k for k, _ in scores}):
        fp32, int8 = scores[kind, "fp32"], scores[kind, "int8"]
        print(
            f"| {kind} | {statistics.mean(fp32):.1f} ± {statistics.stdev(fp32):.1f} % | "
            f"{statistics.mean(int8):.1f} ± {statistics.stdev(int8):.1f} % | "
            f"{statistics.mean(int8) - statistics.mean(fp32):+.2f} points |"
        )


if __name__ == "__main__":
    main()
