"""Issue #31's targets for `cnncodes advise`, measured side by side in one run.

  time        on each shared dataset, one default `cnncodes extract DATA --out X` against
              `cnncodes advise DATA --out Y`, both into cold folders with warm ONNX caches (a
              throw-away run of each on a few images first), back to back, the order alternating
              per dataset and round; the load average at start and end, advise's seconds per stage.
  accuracy    over duplicate-aware splits (`--seed 0..N-1`, the same split options everywhere):
              per seed, advise (train+val only) picks a configuration; the `extract` command it
              prints for the picked codes (into the folder advise filled with their rows) and a
              plain default `extract` (the timed one's folder): one features folder per setting,
              reused across seeds; `fit-svm` on each (its defaults, the kinds `--classifiers`), the
              test accuracy of the run its CV chose;
              beside `LogisticRegression()` on the raw default codes (train+val -> test).
  labels      a `path,label` CSV of Flowers-17 with 5 % of the images (seeded) given a random
              other class; advise on the CSV; recall and precision of its label issues.
Prints markdown tables; each step's numbers are kept in WORK/results (a re-run skips what is done).
docs/results.md ("advise") and docs/benchmarks.md ("advise time") hold the tables of 2026-12-07, made by

    .venv/bin/python scripts/bench_advise.py --tables time --rounds 2
    .venv/bin/python scripts/bench_advise.py --tables accuracy,labels --classifiers logreg

    .venv/bin/python scripts/bench_advise.py [--work /tmp/bench-advise] [--seeds 5] [--seeds-cats 5]
        [--rounds 2] [--tables time,accuracy,labels] [--classifiers all]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = ("oxford17flowers", "cats_dogs_horses_humans")
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CLI = str(Path(sys.executable).parent / "cnncodes")
# Share of Flowers-17 given a wrong class, and the seed that picks them.
NOISE, NOISE_SEED = 0.05, 0
TARGETS = {"time": 2.0, "recall": 0.70, "precision": 0.60}


def cli(args: list[str]) -> float:
    """Run one cnncodes command quietly; its wall-clock seconds."""
    print("$", shlex.join(["cnncodes", *args]), flush=True)
    started = time.perf_counter()
    done = subprocess.run([CLI, *args, "--quiet"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): cnncodes {shlex.join(args)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def memo(path: Path, make: Callable[[], Any]) -> Any:
    """`make()`'s result, kept as JSON at `path` so that a second run of the script reuses it."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def listing(rows: list[tuple[Path, str]], path: Path) -> Path:
    """Write a `path,label` CSV of absolute paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((str(p), label) for p, label in rows)
    return path


def images_of(name: str) -> list[tuple[Path, str]]:
    data = SHARED / "datasets" / name
    return [(f, d.name) for d in sorted(p for p in data.iterdir() if p.is_dir()) for f in sorted(d.glob("*.jpg"))]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(name: str, work: Path, *, advise_first: bool, round_: int) -> dict:
    """One default extract against one advise of the dataset, cold result folders, warm ONNX caches.

    The first round's folders are those the accuracy runs go on with (their rows are reused).
    """
    data = str(SHARED / "datasets" / name)
    rows = images_of(name)
    few = [row for label in sorted({c for _, c in rows}) for row in [r for r in rows if r[1] == label][:3]]
    warm = listing(few, work / "warm" / f"{name}.csv")
    for command in ("extract", "advise"):
        shutil.rmtree(work / "warm" / f"{name}-{command}", ignore_errors=True)
        cli([command, str(warm), "--out", str(work / "warm" / f"{name}-{command}")])
    again = f"-round{round_ + 1}" if round_ else ""
    extract_out, advise_out = work / name / f"extract-default{again}", work / name / f"advise{again}"
    for folder in (extract_out, advise_out):
        shutil.rmtree(folder, ignore_errors=True)
    order = ("advise", "extract") if advise_first else ("extract", "advise")
    seconds = {c: cli([c, data, "--out", str(extract_out if c == "extract" else advise_out)]) for c in order}
    stages = json.loads((advise_out / "advice.json").read_text())["seconds"]
    return {"order": list(order), "seconds": seconds, "stages": stages}


def time_table(results: dict[tuple[str, int], dict], loads: tuple[str, str]) -> str:
    """A row per dataset and round, then each dataset's total over its rounds, then advise's stages."""
    lines = [
        "| dataset | round | order | extract s | advise s | advise / extract | target ≤ 2× |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(name for name, _ in results):
        mine = [(k, r) for (n, k), r in results.items() if n == name]
        for k, r in mine:
            s = r["seconds"]
            lines.append(
                f"| {name} | {k + 1} | {' then '.join(r['order'])} | {s['extract']:.1f} | {s['advise']:.1f} | "
                f"{ratio_cell(s['advise'] / s['extract'])} |"
            )
        extract, advise = (sum(r["seconds"][c] for _, r in mine) for c in ("extract", "advise"))
        lines.append(f"| {name} | all {len(mine)} | | {extract:.1f} | {advise:.1f} | {ratio_cell(advise / extract)} |")
    stages = list(dict.fromkeys(k for r in results.values() for k in r["stages"]))
    lines += ["", "advise's own seconds per stage (advice.json `seconds`):", ""]
    lines += ["| dataset | round | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    lines += [
        f"| {name} | {k + 1} | " + " | ".join(f"{r['stages'].get(stage, 0):.1f}" for stage in stages) + " |"
        for (name, k), r in results.items()
    ]
    lines += ["", f"Load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]}."]
    return "\n".join(lines)


def ratio_cell(ratio: float) -> str:
    return f"{ratio:.2f} | {'met' if ratio <= TARGETS['time'] else '**missed**'}"


def chosen_accuracy(features: Path, models: Path, classifiers: list[str]) -> tuple[str, float]:
    """`fit-svm` with its defaults but `classifiers`: the run its CV chose, and that run's test accuracy."""
    from cnncodes.classify.fit import fit_classifiers
    from cnncodes.runs.report import rank

    shutil.rmtree(models, ignore_errors=True)
    best = rank(fit_classifiers(features, out=models, classifiers=classifiers, progress=False))[0]
    return best["run"], float(best["accuracy"])


def baseline_accuracy(features: Path) -> float:
    """`LogisticRegression()` with its defaults on the raw codes: train+val -> test of the folder's split."""
    from sklearn.linear_model import LogisticRegression

    from cnncodes.codes.features import load_features

    feats = load_features(features)
    fit, test = feats.subsets != "test", feats.subsets == "test"
    model = LogisticRegression().fit(feats.X[fit], feats.y[fit])
    return float((model.predict(feats.X[test]) == feats.y[test]).mean())


def one_seed(name: str, work: Path, seed: int, classifiers: list[str]) -> dict:
    """Advise on the seed's split, then the picked and the default codes scored on its test images."""
    from cnncodes.advise.recommend import extract_args
    from cnncodes.advise.run import advise

    data = SHARED / "datasets" / name
    started = time.perf_counter()
    advice = advise(data, work / name / "advise", seed=seed, progress=False)
    advise_seconds = time.perf_counter() - started
    default = work / name / "extract-default"
    cli(["extract", str(data), "--out", str(default), "--seed", str(seed)])
    run, accuracy = chosen_accuracy(default, work / name / "models" / f"seed{seed}-default", classifiers)
    scores = {"default": accuracy, "default_run": run, "baseline": baseline_accuracy(default)}
    picked = advice.chosen
    if picked == advice.default.candidate:
        scores |= {"picked": accuracy, "picked_run": run}
    else:  # the first extract advise prints is the picked codes', into the folder it filled with their rows
        line = shlex.split(next(c for c in advice.commands if c.startswith("cnncodes extract ")))[1:]
        features = Path(line[line.index("--out") + 1])
        cli(line)
        models = work / name / "models" / f"seed{seed}-{features.name}"
        run, accuracy = chosen_accuracy(features, models, classifiers)
        scores |= {"picked": accuracy, "picked_run": run}
    best = advice.best.candidate.name
    gain = advice.gains.get(best)
    return scores | {
        "seed": seed,
        "picked_config": picked.name,
        "extract_options": shlex.join(extract_args(picked)),
        "best": best,
        "best_gain": None if gain is None else [float(gain.mean), float(gain.low), float(gain.high)],
        "advise_seconds": advise_seconds,
    }


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def gain_cell(row: dict) -> str:
    """The held-out gain advise measured for its best candidate (on train+val), with its bootstrap interval."""
    if row["best_gain"] is None:
        return "best is the default"
    mean, low, high = (100 * x for x in row["best_gain"])
    return f"{row['best']}: {mean:+.1f} [{low:+.1f}, {high:+.1f}] points"


def accuracy_table(name: str, rows: list[dict]) -> str:
    lines = [
        "| seed | picked configuration (extract options) | picked: run chosen on CV | picked acc | "
        "default: run chosen on CV | default acc | LogisticRegression() on default codes | "
        "advise's best − default, train+val [interval, 95 % for all candidates together] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['picked_config']} (`{r['extract_options'] or 'defaults'}`) | {r['picked_run']} | "
            f"{100 * r['picked']:.1f} | {r['default_run']} | {100 * r['default']:.1f} | {100 * r['baseline']:.1f} | "
            f"{gain_cell(r)} |"
        )
    picked, default = [r["picked"] for r in rows], [r["default"] for r in rows]
    verdict = "met" if statistics.mean(picked) >= statistics.mean(default) else "**missed**"
    lines.append(
        f"| mean ± sd ({len(rows)} splits) | | | {mean_sd(picked)} | | {mean_sd(default)} | "
        f"{mean_sd([r['baseline'] for r in rows])} | |"
    )
    return "\n".join(lines) + f"\n\nTarget (picked mean ≥ default mean) on {name}: {verdict}."


def noisy_labels(work: Path) -> tuple[Path, dict[str, str]]:
    """Flowers-17 as a CSV with 5 % of the images given a random other class; the moved paths and their true class."""
    rows = images_of("oxford17flowers")
    classes = sorted({label for _, label in rows})
    rng = np.random.default_rng(NOISE_SEED)
    moved = rng.choice(len(rows), size=round(NOISE * len(rows)), replace=False)
    truth = {}
    for i in moved:
        path, label = rows[i]
        rows[i] = (path, str(rng.choice([c for c in classes if c != label])))
        truth[str(path.resolve())] = label
    return listing(rows, work / "labels" / "flowers-noisy.csv"), truth


def label_issues(work: Path) -> dict:
    from cnncodes.advise.run import advise

    table, truth = noisy_labels(work)
    started = time.perf_counter()
    advice = advise(table, work / "labels" / "advise", progress=False)
    seconds = time.perf_counter() - started
    flagged = [str((table.parent / s["path"]).resolve()) for s in advice.suspects]
    hits = [p for p in flagged if p in truth]
    return {
        "moved": len(truth),
        "flagged": len(flagged),
        "hits": len(hits),
        "recall": len(hits) / len(truth),
        "precision": len(hits) / len(flagged) if flagged else 0.0,
        "flagged_not_moved": sorted(p for p in flagged if p not in truth),
        "copies": advice.copies,
        "seconds": seconds,
    }


def labels_table(r: dict) -> str:
    recall_met = "met" if r["recall"] >= TARGETS["recall"] else "**missed**"
    precision_met = "met" if r["precision"] >= TARGETS["precision"] else "**missed**"
    return "\n".join(
        [
            "| images given a wrong class | flagged by advise | of them moved | recall (target ≥ 70 %) | "
            "precision (target ≥ 60 %) | cross-class near-duplicate groups |",
            "|---|---|---|---|---|---|",
            f"| {r['moved']} of 1360 | {r['flagged']} | {r['hits']} | {100 * r['recall']:.1f} % ({recall_met}) | "
            f"{100 * r['precision']:.1f} % ({precision_met}) | {len(r['copies'])} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-advise"))
    parser.add_argument("--seeds", type=int, default=5, help="splits on Flowers-17")
    parser.add_argument("--seeds-cats", type=int, default=5, help="splits on cats_dogs_horses_humans")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, the order alternating")
    parser.add_argument("--tables", default="time,accuracy,labels")
    parser.add_argument(
        "--classifiers", default="all", help="fit-svm's kinds, e.g. logreg,linear-svm (all: its default)"
    )
    args = parser.parse_args()
    tables = set(args.tables.split(","))
    classifiers = args.classifiers.split(",")
    results = args.work / "results"
    if "time" in tables:
        start = load_average()
        times = {
            (name, r): memo(
                results / f"time-{name}-round{r}.json",
                partial(timed, name, args.work, advise_first=(k + r) % 2 == 1, round_=r),
            )
            for r in range(args.rounds)
            for k, name in enumerate(DATASETS)
        }
        print("\n## advise time\n\n" + time_table(times, (start, load_average())), flush=True)
    if "accuracy" in tables:
        for name, seeds in zip(DATASETS, (args.seeds, args.seeds_cats)):
            if not seeds:
                continue
            rows = [
                memo(results / f"accuracy-{name}-seed{s}.json", partial(one_seed, name, args.work, s, classifiers))
                for s in range(seeds)
            ]
            print(f"\n### {name}\n\n" + accuracy_table(name, rows), flush=True)
    if "labels" in tables:
        found = memo(results / "labels.json", lambda: label_issues(args.work))
        print("\n### Label issues\n\n" + labels_table(found), flush=True)


if __name__ == "__main__":
    main()
