"""Measured accuracy on the real datasets, made with the tool's own commands.

For each dataset in ../shared/datasets: CNN codes from every backbone whose ImageNet weights
resolve (the others are listed as skipped, with the reason) x linear-svm, logreg, rbf-svm and
knn; plus a fine-tune of MobileNetV2 on the same split; then `compare`. A layer sweep on one
dataset shows where the best code sits. Writes docs/results.md (tables, the command lines
that made them, machine, date, versions) and prints the README summary.

    .venv/bin/python scripts/bench_accuracy.py [--work /tmp/cnncodes-accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CLI = str(Path(sys.executable).parent / "cnncodes")
DATASETS = ("oxford17flowers", "cats_dogs_horses_humans")
BACKBONES = ("mobilenetv2", "vgg16", "resnet50")
SEED = 0


def run(args: list[str], log: list[str]) -> str:
    """Run one cnncodes command, remember its command line, return its stdout."""
    log.append(shlex.join(["cnncodes", *args]))
    print("$", log[-1], flush=True)
    done = subprocess.run([CLI, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {log[-1]}\n{done.stderr[-3000:]}")
    return done.stdout


def weights_missing(backbone: str) -> str | None:
    from cnncodes.backbones import get_backbone
    from cnncodes.weights import search_dirs

    entry = get_backbone(backbone)
    if any((d / entry.weights_file).is_file() for d in search_dirs()):
        return None
    return f"{entry.weights_file} is in none of {', '.join(map(str, search_dirs()))} and this machine is offline"


def dataset_runs(name: str, work: Path, args, log: list[str], skipped: dict[str, str]) -> list[dict]:
    data = SHARED / "datasets" / name
    models = work / name / "models"
    for backbone in BACKBONES:
        if weights_missing(backbone):
            skipped[backbone] = weights_missing(backbone)
            continue
        features = work / name / f"features-{backbone}"
        run(["extract", str(data), "--out", str(features), "--backbone", backbone, "--seed", str(SEED), "--quiet"], log)
        run(["fit-svm", str(features), "--out", str(models), "--seed", str(SEED), "--quiet"], log)
    run(["finetune", str(data), "--out", str(models), "--split-from", str(work / name / "features-mobilenetv2"),
         "--backbone", "mobilenetv2", "--image-size", str(args.finetune_size), "--head-epochs", str(args.head_epochs),
         "--fine-epochs", str(args.fine_epochs), "--seed", str(SEED), "--quiet"], log)
    return json.loads(run(["compare", str(models), "--format", "json"], log))


def layer_sweep(name: str, work: Path, log: list[str]) -> list[dict]:
    from cnncodes.backbones import get_backbone

    data = SHARED / "datasets" / name
    rows = []
    for layer in get_backbone("mobilenetv2").taps:
        features = work / name / f"sweep-{layer}"
        models = work / name / f"sweep-models-{layer}"
        run(["extract", str(data), "--out", str(features), "--layer", layer, "--seed", str(SEED), "--quiet"], log)
        run(["fit-svm", str(features), "--out", str(models), "--classifier", "logreg", "--classifier", "linear-svm",
             "--seed", str(SEED), "--quiet"], log)
        meta = json.loads((features / "meta.json").read_text())
        rows += [dict(r, dim=meta["dim"]) for r in json.loads(run(["compare", str(models), "--format", "json"], log))]
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def table(records: list[dict]) -> str:
    lines = ["| run | method | accuracy [95% CI] | balanced acc | macro-F1 | fit s | extract s |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lo, hi = r["accuracy_ci95"]
        extract = "-" if r.get("extract_seconds") is None else f"{r['extract_seconds']:.1f}"
        lines.append(f"| {r['run']} | {r['method']} | {pct(r['accuracy'])} [{pct(lo)}–{pct(hi)}] | "
                     f"{pct(r['balanced_accuracy'])} | {pct(r['macro_f1'])} | {r['fit_seconds']:.1f} | {extract} |")
    return "\n".join(lines)


def summary(results: dict[str, list[dict]]) -> str:
    lines = ["| dataset | test images | best CNN-codes run | accuracy | best fine-tune | accuracy |", "|---|---|---|---|---|---|"]
    for name, records in results.items():
        codes = max((r for r in records if r["method"] == "cnn-codes"), key=lambda r: r["accuracy"])
        tuned = max((r for r in records if r["method"] == "finetune"), key=lambda r: r["accuracy"])
        lines.append(f"| {name} | {codes['n_test']} | {codes['run']} | {pct(codes['accuracy'])} | {tuned['run']} | "
                     f"{pct(tuned['accuracy'])} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from cnncodes.artifacts import package_versions

    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}; {versions}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-accuracy"))
    parser.add_argument("--finetune-size", type=int, default=160)
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--fine-epochs", type=int, default=5)
    parser.add_argument("--sweep", default="oxford17flowers")
    args = parser.parse_args()
    os.environ.setdefault("CNNCODES_CACHE_DIR", str(args.work / "cache"))
    log: list[str] = []
    skipped: dict[str, str] = {}
    results = {name: dataset_runs(name, args.work, args, log, skipped) for name in DATASETS}
    sweep = layer_sweep(args.sweep, args.work, log)
    sweep_lines = ["| layer | code length | classifier | accuracy [95% CI] |", "|---|---|---|---|"]
    sweep_lines += [f"| {r['layer']} | {r['dim']} | {r['classifier']} | {pct(r['accuracy'])} "
                    f"[{pct(r['accuracy_ci95'][0])}–{pct(r['accuracy_ci95'][1])}] |" for r in sweep]
    sections = [f"# Measured accuracy\n\nMade by `scripts/bench_accuracy.py` on {date.today().isoformat()}: {machine()}.\n"
                f"One seed ({SEED}), the duplicate-aware split of `cnncodes extract` (70/15/15), the same test images "
                "for every row of a dataset; the test subset was never used to choose anything.\n",
                "## Summary\n\n" + summary(results)]
    for name, records in results.items():
        sections.append(f"## {name}\n\n{table(records)}")
    sections.append(f"## Layer sweep: MobileNetV2 on {args.sweep}\n\n" + "\n".join(sweep_lines))
    sections.append("## Backbones skipped\n\n" + ("\n".join(f"- {b}: {why}" for b, why in skipped.items()) or "none"))
    sections.append("## Command lines\n\n```sh\n" + "\n".join(log) + "\n```")
    out = ROOT / "docs" / "results.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")
    print("\n" + summary(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
