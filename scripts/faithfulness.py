"""How faithful `cnncodes explain`'s class activation maps are, against random maps, on a held-out test split.

With the tool's own commands, in --work: `extract` ../shared/datasets/oxford17flowers with its
defaults (ImageNet MobileNetV2, codes averaged over three sizes, the duplicate-aware split of
seed 0), `fit-svm --classifier logreg`, then `explain` (faithfulness on) of the bundle on the
split's test images, the ones split.csv marks `test`. explain.json holds each image's deletion and
insertion AUC (RISE's protocol, 20 steps of 5 % of the pixels) of its CAM and of a random map
(noise per cell of the feature map, upsampled like the heat map). Prints, for both curves: the
mean and sd over the images of CAM and of random; the paired difference CAM - random, with its sd
and 95% t-interval; how many images CAM beats random on; and Wilcoxon's signed-rank p-value.
Lower deletion AUC and higher insertion AUC mean a more faithful map.

    .venv/bin/python scripts/faithfulness.py [--work /tmp/cnncodes-faithfulness] [--dataset oxford17flowers]
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
from bench_accuracy import machine
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CLI = str(Path(sys.executable).parent / "cnncodes")
# (curve, sign): CAM beats random when sign * (CAM - random) > 0.
CURVES = (("deletion", -1), ("insertion", 1))


def run(args: list[str], commands: list[str], *, needed: bool, shown: list[str] | None = None) -> None:
    """Run a cnncodes command if `needed` (its output is missing); its command line (or `shown`) goes in the docs."""
    commands.append(shlex.join(["cnncodes", *(shown or args)]))
    if needed:
        subprocess.run([CLI, *args], check=True)


def test_images(features: Path) -> list[str]:
    """The images split.csv puts in the test subset, as paths under the data folder meta.json names."""
    data = Path(json.loads((features / "meta.json").read_text())["data"])
    with (features / "split.csv").open(newline="") as f:
        return [str(data / row["path"]) for row in csv.DictReader(f) if row["subset"] == "test"]


def scores(explained: Path) -> dict[str, np.ndarray]:
    """Per measured image of explain.json: each faithfulness score."""
    images = json.loads((explained / "explain.json").read_text())["images"]
    measured = [image["faithfulness"] for image in images if image.get("faithfulness")]
    return {name: np.array([m[name] for m in measured]) for name in measured[0]}


def comparison(found: dict[str, np.ndarray]) -> list[str]:
    """One markdown row per curve: CAM against random, paired."""
    rows = []
    for curve, sign in CURVES:
        cam, chance = found[curve], found[f"random_{curve}"]
        difference = cam - chance
        n = len(difference)
        mean, sd = float(difference.mean()), float(difference.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
        wins = int((sign * difference > 0).sum())
        p = float(stats.wilcoxon(cam, chance).pvalue)
        better = "lower" if sign < 0 else "higher"
        rows.append(
            f"| {curve} ({better} is better) | {n} | {cam.mean():.3f} ± {cam.std(ddof=1):.3f} "
            f"| {chance.mean():.3f} ± {chance.std(ddof=1):.3f} | {mean:+.3f} ± {sd:.3f} "
            f"| [{mean - half:+.3f}, {mean + half:+.3f}] | {abs(mean) / sd:.2f} | {wins}/{n} | {p:.1e} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-faithfulness"))
    parser.add_argument("--dataset", default="oxford17flowers")
    parser.add_argument("--limit", type=int, help="explain N test images spread evenly over the split's list")
    args = parser.parse_args()
    features, models, explained = (args.work / name for name in ("features", "models", "explained"))
    commands: list[str] = []
    run(
        ["extract", str(DATASETS / args.dataset), "--out", str(features), "--quiet"],
        commands,
        needed=not (features / "meta.json").is_file(),
    )
    fit = ["fit-svm", str(features), "--out", str(models), "--classifier", "logreg", "--quiet"]
    run(fit, commands, needed=not any(models.glob("*logreg*.joblib")))
    bundle = sorted(models.glob("*logreg*.joblib"))[0]
    images = test_images(features)
    if args.limit and args.limit < len(images):  # split.csv lists the images class by class: every k-th one
        images = images[:: -(-len(images) // args.limit)]
    command = ["explain", str(bundle), *images, "--out", str(explained), "--quiet"]
    shown = [*command[:2], f"<the {len(images)} test images of split.csv>", *command[-3:]]
    run(command, commands, needed=not (explained / "explain.json").is_file(), shown=shown)
    found = scores(explained)
    means = {name: statistics.mean(values) for name, values in found.items()}
    print(
        f"# faithfulness of CAM against random maps, {args.dataset} test split ({len(images)} images), "
        f"{bundle.name}, {date.today()}\n# {machine()}\n"
    )
    print(
        "| curve | images | CAM AUC (mean ± sd) | random AUC (mean ± sd) | CAM − random (mean ± sd) "
        "| 95% interval of the mean difference | mean / sd | images CAM beats random on | Wilcoxon p |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(comparison(found)))
    print(f"\nmeans from explain.json: {json.dumps(means)}")
    print("\n```sh\n" + "\n".join(commands) + "\n```")


if __name__ == "__main__":
    main()
